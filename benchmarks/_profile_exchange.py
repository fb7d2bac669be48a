"""Where an exchange's time goes: phase timers on both peers, isolated costs, cProfile.

Runs ``--reps`` exchanges of ``--size`` float32 between this process and
``_responder.py --phases`` (both under uvloop), and prints

1. the median wall time of each phase on each side (see ``_phases.py``);
2. the cost of each array operation of the exchange path on its own, in an idle process;
3. with ``--cprofile``, the top functions by own time on both sides.

    .venv/bin/python benchmarks/_profile_exchange.py --size 10000000 --cprofile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from _phases import PhaseClock, instrument
from common import Helper, markdown_table

from gossip.averaging import check_update, mix
from gossip.exchange import Exchanger
from gossip.store import ArrayStore
from p2p.node import Node
from p2p.transport import TcpTransport

SETTLE = 0.2  # seconds between rounds: longer than a responder's check + mix of 40 MB


async def _rounds(size: int, addr: str, reps: int, warmup: int, clock: PhaseClock) -> None:
    weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    node = Node(TcpTransport(), "initiator")
    await node.start("127.0.0.1", 0)
    exchanger = Exchanger(node, ArrayStore(weights, schema=f"bench-{size}"))
    instrument(exchanger, clock)
    try:
        for i in range(warmup + reps):
            # Let the responder finish mixing the previous round, so it does not decline.
            await asyncio.sleep(SETTLE)
            clock.discard_round()
            t0 = time.perf_counter()
            outcome = await exchanger.exchange(addr)
            if not outcome.ok:
                raise RuntimeError(f"exchange failed: {outcome.reason}")
            if i < warmup:
                clock.discard_round()
            else:
                clock.end_round(time.perf_counter() - t0)
    finally:
        await node.close()


def phases(size: int, reps: int, warmup: int, profile_dir: Path | None) -> dict[str, Any]:
    """Phase medians (ms) of both sides; with ``profile_dir``, cProfile dumps of both."""
    clock = PhaseClock()
    extra = ["--profile", str(profile_dir / "responder.prof")] if profile_dir else []
    with Helper("_responder.py", ["--size", str(size), "--phases", *extra]) as responder:
        profiler = cProfile.Profile() if profile_dir else None
        if profiler is not None:
            profiler.enable()
        uvloop.run(_rounds(size, responder.addr, reps, warmup, clock))
        if profiler is not None and profile_dir is not None:
            profiler.disable()
            profiler.dump_stats(profile_dir / "initiator.prof")
        out = responder.stop()
    theirs: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith("PHASES "):
            theirs = json.loads(line[7:])
    return {"initiator": clock.medians_ms(), "responder": theirs}


def _median_ms(fn: Callable[[], object], reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def isolated_costs(size: int) -> dict[str, float]:
    """Each array operation of the exchange path alone, median ms, in this (idle) process."""
    rng = np.random.default_rng(0)
    local = rng.standard_normal(size, dtype=np.float32)
    remote = rng.standard_normal(size, dtype=np.float32)
    current = local.copy()
    reused = bytearray(local.nbytes)
    scratch = np.empty_like(local)
    return {
        "bytearray(n) (decoder payload alloc)": _median_ms(lambda: bytearray(local.nbytes)),
        "fill a reused buffer (memcpy)": _median_ms(
            lambda: memoryview(reused).__setitem__(slice(None), remote.data.cast("B"))
        ),
        "snapshot: weights.copy()": _median_ms(local.copy),
        "snapshot into a reused buffer": _median_ms(lambda: np.copyto(scratch, local)),
        "np.isfinite(w).all()": _median_ms(lambda: np.isfinite(local).all()),
        "check_update": _median_ms(lambda: check_update(remote, local)),
        "mix": _median_ms(lambda: mix(current, local, remote)),
    }


def top_functions(path: Path, limit: int = 15) -> str:
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("tottime").print_stats(limit)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="also profile both sides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        profile_dir = Path(tmp) if args.cprofile else None
        by_side = phases(args.size, args.reps, args.warmup, profile_dir)
        if profile_dir is not None:
            for side in ("initiator", "responder"):
                print(f"## cProfile, {side}, top by own time\n")
                print(top_functions(profile_dir / f"{side}.prof"))
    names = list(by_side["initiator"])
    names += [n for n in by_side["responder"] if n not in names]
    rows = [
        [n, by_side["initiator"].get(n, float("nan")), by_side["responder"].get(n, float("nan"))]
        for n in names
    ]
    print(f"## Phases of one exchange, {args.size:,} float32, median ms\n")
    print(markdown_table(["phase", "initiator", "responder"], rows))
    costs = isolated_costs(args.size)
    print(f"\n## Isolated costs, {args.size:,} float32, median ms\n")
    print(markdown_table(["operation", "ms"], [[k, v] for k, v in costs.items()]))
    print("\n" + json.dumps({"size": args.size, "phases_ms": by_side, "isolated_ms": costs}))


if __name__ == "__main__":
    main()
