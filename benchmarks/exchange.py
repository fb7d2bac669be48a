"""Exchange benchmark: push-pull goodput between two peer processes vs raw sockets and gloo.

For each size, in one run and on 127.0.0.1:

- raw one-way ceiling: plain blocking ``sendall`` into a peer that ``recv_into``s a
  preallocated buffer and acks one byte; ceiling = bytes / time;
- raw duplex (for reference): both sides send the same size at once, goodput = 2 * bytes / time;
- exchange: ``Exchanger.exchange(addr)`` against ``benchmarks/_responder.py`` in another
  process, both under uvloop, connect + handshake + offer + payloads + check + mix included;
  goodput = 2 * bytes / time;
- exchange_sealed: the same with a keyring on both ends (``p2p.secure``: authenticated
  handshake, every frame AES-256-GCM sealed): the cost of security, same run;
- gloo: ``torch.distributed.all_reduce`` of the same tensor with 2 processes; each rank sends
  and receives one tensor's worth, so goodput = 2 * bytes / time as well.

The raw, duplex and exchange repetitions are interleaved round by round, so load from other
processes on the machine hits all three alike; gloo runs after them.

    .venv/bin/python benchmarks/exchange.py            # 1M and 10M float32, 10 reps
    .venv/bin/python benchmarks/exchange.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from common import (
    BENCH_DIR,
    Helper,
    command_line,
    emit,
    machine_info,
    markdown_table,
    mb_per_s,
    read_result,
    summarize,
)

from gossip.exchange import Exchanger
from gossip.store import ArrayStore
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring, write_secret
from p2p.transport import TcpTransport

log = logging.getLogger(__name__)

TARGET_RATIO = 0.70  # goodput must reach 70% of the raw one-way ceiling (the target)
# Deadline for one raw round and for the gloo processes; loopback moves 40 MB in ~50 ms.
ROUND_TIMEOUT = 60.0
GLOO_TIMEOUT = 300.0
BUSY_PAUSE = 0.005  # pause before retrying an offer the responder declined as busy


@dataclass(frozen=True)
class BenchConfig:
    # Model sizes in float32 values; the issue asks for 1M (4 MB) and 10M (40 MB).
    sizes: tuple[int, ...] = (1_000_000, 10_000_000)
    # Timed repetitions per method and size; medians of 10 are stable enough on loopback.
    reps: int = 10
    # Untimed repetitions first: page faults on fresh buffers, TCP window growth, imports.
    warmup: int = 3
    # Also measure gloo all_reduce (needs torch; two extra processes per size).
    gloo: bool = True


QUICK = BenchConfig(sizes=(65_536, 262_144), reps=3, warmup=1)


# -- raw sockets ---------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("raw peer closed")
        got += n


class RawClient:
    """The initiator side of ``_raw_peer.py``: one connection, timed rounds."""

    def __init__(self, addr: str, nbytes: int, duplex: bool) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=ROUND_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.duplex = duplex
        self.out = memoryview(np.random.default_rng(0).bytes(nbytes))
        self.inbox = memoryview(bytearray(nbytes))
        self.ack = memoryview(bytearray(1))

    def round(self) -> float:
        t0 = time.perf_counter()
        if self.duplex:
            sender = threading.Thread(target=self.sock.sendall, args=(self.out,), daemon=True)
            sender.start()
            _recv_exact(self.sock, self.inbox)
            sender.join(ROUND_TIMEOUT)
        else:
            self.sock.sendall(self.out)
        _recv_exact(self.sock, self.ack)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()


# -- the exchange path ---------------------------------------------------------------------
async def _start_initiator(size: int, keyring: Keyring | None = None) -> Exchanger:
    weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    node = Node(TcpTransport(), "initiator", NodeConfig(keyring=keyring))
    await node.start("127.0.0.1", 0)
    return Exchanger(node, ArrayStore(weights, schema=f"bench-{size}"))


async def timed_exchange(exchanger: Exchanger, addr: str, attempts: int = 200) -> float:
    """Seconds of one successful exchange with ``addr``.

    Right after an exchange the responder may still be checking and mixing what it got
    (the initiator does not wait for that) and declines as busy; such attempts are retried
    after a short pause and not timed.
    """
    for _ in range(attempts):
        t0 = time.perf_counter()
        outcome = await exchanger.exchange(addr)
        elapsed = time.perf_counter() - t0
        if outcome.ok:
            return elapsed
        if not outcome.busy:
            raise RuntimeError(f"exchange with {addr} failed: {outcome.reason}")
        await asyncio.sleep(BUSY_PAUSE)
    raise RuntimeError(f"{addr} stayed busy for {attempts} attempts")


# -- gloo ------------------------------------------------------------------------------------
def gloo_allreduce(size: int, reps: int, warmup: int) -> list[float]:
    """Rank 0's timings of ``reps`` all_reduces of ``size`` float32 over 2 gloo processes."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'rendezvous'}"
        procs = [
            subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "_gloo_peer.py"), "--rank", str(rank)]
                + ["--world", "2", "--size", str(size), "--reps", str(reps)]
                + ["--warmup", str(warmup), "--init", init],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank in (0, 1)
        ]
        try:
            out, _ = procs[0].communicate(timeout=GLOO_TIMEOUT)
            procs[1].wait(timeout=GLOO_TIMEOUT)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    result = read_result(out)
    if result is not None:
        return [float(s) for s in result["seconds"]]
    raise RuntimeError(f"gloo rank 0 printed no result (exit {procs[0].returncode})")


# -- one size --------------------------------------------------------------------------------
def _interleaved(size: int, cfg: BenchConfig) -> dict[str, list[float]]:
    nbytes = 4 * size
    times: dict[str, list[float]] = {
        "raw_one_way": [], "raw_duplex": [], "exchange": [], "exchange_sealed": []
    }  # fmt: skip
    secret = write_secret(Path(tempfile.mkdtemp(prefix="gt-bench-")) / "secret")
    with (
        Helper("_raw_peer.py", ["--size", str(size)]) as one_way,
        Helper("_raw_peer.py", ["--size", str(size), "--duplex"]) as duplex,
        Helper("_responder.py", ["--size", str(size)]) as responder,
        Helper("_responder.py", ["--size", str(size), "--secret-file", str(secret)]) as sealed,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        clients = {
            "raw_one_way": RawClient(one_way.addr, nbytes, duplex=False),
            "raw_duplex": RawClient(duplex.addr, nbytes, duplex=True),
        }
        exchanger = runner.run(_start_initiator(size))
        sealed_exchanger = runner.run(_start_initiator(size, Keyring.from_file(secret)))
        try:
            for i in range(cfg.warmup + cfg.reps):
                sample = {name: c.round() for name, c in clients.items()}
                sample["exchange"] = runner.run(timed_exchange(exchanger, responder.addr))
                sample["exchange_sealed"] = runner.run(
                    timed_exchange(sealed_exchanger, sealed.addr)
                )
                if i >= cfg.warmup:
                    for name, seconds in sample.items():
                        times[name].append(seconds)
        finally:
            for c in clients.values():
                c.close()
            runner.run(exchanger.node.close())
            runner.run(sealed_exchanger.node.close())
            secret.unlink()
    return times


def method_result(seconds: list[float], moved: int) -> dict[str, Any]:
    s = summarize(seconds)
    return {
        **s.as_dict(),
        "bytes_moved": moved,
        "mb_s_median": mb_per_s(moved, s.median),
        "mb_s_best": mb_per_s(moved, s.best),
    }


def bench_size(size: int, cfg: BenchConfig) -> dict[str, Any]:
    nbytes = 4 * size
    log.info("size %d float32 (%d bytes)", size, nbytes)
    times = _interleaved(size, cfg)
    if cfg.gloo:
        times["gloo_allreduce"] = gloo_allreduce(size, cfg.reps, cfg.warmup)
    moved = {"raw_one_way": nbytes}
    methods = {k: method_result(v, moved.get(k, 2 * nbytes)) for k, v in times.items()}
    ceiling = methods["raw_one_way"]
    ratios = {
        f"{k}_vs_ceiling_median": v["mb_s_median"] / ceiling["mb_s_median"]
        for k, v in methods.items()
        if k != "raw_one_way"
    }
    ratios["exchange_vs_ceiling_best"] = methods["exchange"]["mb_s_best"] / ceiling["mb_s_best"]
    return {
        "floats": size,
        "nbytes": nbytes,
        "methods": methods,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": ratios["exchange_vs_ceiling_median"] >= TARGET_RATIO,
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        m, ratios = r["methods"], r["ratios"]
        for name in ("raw_one_way", "raw_duplex", "exchange", "exchange_sealed", "gloo_allreduce"):
            if name not in m:
                continue
            ratio = 1.0 if name == "raw_one_way" else ratios[f"{name}_vs_ceiling_median"]
            rows.append(
                [
                    f"{r['floats']:,}",
                    name,
                    f"{m[name]['median_s'] * 1e3:.2f}",
                    f"{m[name]['best_s'] * 1e3:.2f}",
                    f"{m[name]['mb_s_median']:,.0f}",
                    f"{m[name]['mb_s_best']:,.0f}",
                    f"{ratio:.0%}",
                ]
            )
    headers = [
        "float32",
        "method",
        "median ms",
        "best ms",
        "MB/s (median)",
        "MB/s (best)",
        "vs ceiling (median)",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--sizes", default="", help="comma-separated float32 counts")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo reference")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    cfg = QUICK if args.quick else BenchConfig()
    if args.sizes:
        cfg = replace(cfg, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.reps:
        cfg = replace(cfg, reps=args.reps)
    if args.no_gloo:
        cfg = replace(cfg, gloo=False)
    machine = machine_info()
    results = [bench_size(size, cfg) for size in cfg.sizes]
    out = {
        "benchmark": "exchange",
        "command": command_line(),
        "machine": machine,
        "config": asdict(cfg),
        "loop": "uvloop " + uvloop.__version__,
        "results": results,
    }
    emit(out, [table(results)], args.json)


if __name__ == "__main__":
    main()
