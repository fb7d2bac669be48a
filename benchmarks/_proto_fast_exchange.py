"""Prototype: the same push-pull with the copies and allocations taken out of its path.

Not product code: it proves, in numbers, what the suggestions in
docs/benchmarks-draft-part1.md buy, without editing p2p/ or gossip/. Changes against the
committed exchange, each one measured to cost the most in ``_profile_exchange.py``:

1. reused receive buffer: a large payload lands in a buffer the exchanger owns and reuses,
   instead of a fresh ``bytearray(n)`` per frame (zeroing 40 MB plus its page faults,
   about 20 ms at 10M float32, and the receive stalls meanwhile);
2. one-pass check: the delta ``remote - snapshot`` is computed in place in that buffer; its
   norm is the distance check and a non-finite norm is the NaN check (our snapshot is
   finite), and the mix adds half of it: no temporaries, three passes instead of eight;
3. snapshot into a reused buffer, its finiteness folded into the norm the check needs;
4. the initiator snapshots before it offers, overlapping the responder's snapshot;
5. the check runs on the loop for models under 8 MB: a worker-thread handoff costs more
   than the check itself there (0.6 ms against 0.3 ms at 1M float32 on a loaded box);
6. (the ``proto_reuse`` rows only) the initiator keeps its connection to a peer between
   exchanges, so connect + handshake and a fresh socket's slow first window are paid once.

Run:

    .venv/bin/python benchmarks/_proto_fast_exchange.py            # compare, 1M and 10M
    .venv/bin/python benchmarks/_proto_fast_exchange.py --serve --size N   # responder
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import uvloop
from common import Helper, announce, emit, machine_info, markdown_table
from exchange import RawClient, method_result, timed_exchange

import p2p.transport as transport_module
from gossip.averaging import UpdateRejected
from gossip.exchange import Exchanger, Outcome
from gossip.store import ArrayStore
from p2p.framing import Decoder, Frame, FrameError, Limits, MsgType
from p2p.node import Node
from p2p.transport import Connection, TcpTransport, TransportError

log = logging.getLogger(__name__)

POOL_MIN = 1 << 20  # payloads at least this large are received into pooled buffers
INLINE_MAX = 8 << 20  # checks of payloads smaller than this run on the event loop
MAX_LIFETIME = 3600.0  # the serving process never outlives this


# -- 1. reused receive buffers -----------------------------------------------------------------
class BufferPool:
    """Free receive buffers by size. Taken by the decoder, given back after the mix."""

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}

    def take(self, nbytes: int) -> memoryview:
        free = self._free.get(nbytes)
        buf = free.pop() if free else np.empty(nbytes, dtype=np.uint8)
        return buf.data

    def give(self, view: memoryview) -> None:
        base = view.obj
        if isinstance(base, np.ndarray) and base.nbytes == view.nbytes:
            self._free.setdefault(view.nbytes, []).append(base)


@dataclass(frozen=True)
class PooledLimits(Limits):
    # Where large payloads are received; transports built with plain Limits never pool.
    pool: BufferPool = field(default_factory=BufferPool)


class PooledDecoder(Decoder):
    """``Decoder`` whose large payloads come from ``limits.pool`` (when it has one)."""

    def _header_done(self) -> None:
        pool = getattr(self.limits, "pool", None)
        if pool is None or self._plen < POOL_MIN:
            super()._header_done()
            return
        # The same checks as Decoder._header_done; only the allocation differs.
        try:
            header = msgpack.unpackb(
                bytes(self._head), raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0
            )
        except Exception as exc:
            raise FrameError(f"undecodable frame header: {exc}") from None
        self._head_len, self._head = 0, bytearray()
        seg = header.get("_seg", []) if isinstance(header, dict) else None
        if (
            not isinstance(seg, list)
            or len(seg) > self.limits.max_segments
            or not all(isinstance(n, int) and n >= 0 for n in seg)
            or sum(seg) != self._plen
        ):
            raise FrameError("frame header is not a map, or its segments do not match")
        self._header = header
        self._payload = pool.take(self._plen)  # no zeroing, no fresh page faults
        self._got = 0


# The decoder is looked up when each connection is made; PooledDecoder behaves exactly like
# Decoder unless its transport was built with PooledLimits, so stock runs are unaffected.
transport_module.Decoder = PooledDecoder  # type: ignore[misc]


# -- 2. and 3. snapshot and one-pass check -----------------------------------------------------
class FastStore(ArrayStore):
    """``ArrayStore`` with a reused snapshot buffer and a mix that takes a ready delta."""

    def __init__(self, weights: np.ndarray, schema: str) -> None:
        super().__init__(weights, schema)
        self._snap = np.empty_like(self.weights)

    async def snapshot(self) -> np.ndarray:
        np.copyto(self._snap, self.weights)
        return self._snap

    async def mix_delta(self, delta: np.ndarray, alpha: float = 0.5) -> None:
        """current += alpha * delta; ``delta`` is scratch and is overwritten."""
        async with self._lock:
            np.multiply(delta, alpha, out=delta)
            np.add(self.weights, delta, out=self.weights)


def own_norm(snap: np.ndarray) -> float:
    """Norm of our snapshot; raises if it is not finite (replaces the isfinite pass)."""
    norm = math.sqrt(float(np.dot(snap, snap)))
    if not math.isfinite(norm):
        raise UpdateRejected("our own weights are not finite; not exchanging")
    return norm


def delta_in_place(remote: np.ndarray, snap: np.ndarray, limit: float) -> np.ndarray:
    """remote <- remote - snap, checked: finite, and within ``limit`` of our snapshot."""
    delta = np.subtract(remote, snap, out=remote)
    dist = math.sqrt(float(np.dot(delta, delta)))
    if not math.isfinite(dist):
        raise UpdateRejected("weight vector holds NaN or infinity (or is absurdly large)")
    if dist > limit:
        raise UpdateRejected(f"weight vector is implausibly far from ours ({dist:.3g})")
    return delta


# -- 4. the exchange, reordered --------------------------------------------------------------
class FastExchanger(Exchanger):
    store: FastStore

    def __init__(self, node: Node, store: FastStore, pool: BufferPool, reuse: bool) -> None:
        super().__init__(node, store)
        self.pool = pool
        self.reuse = reuse  # keep one open connection per peer between exchanges
        self._conns: dict[str, Connection] = {}

    async def _connect(self, addr: str) -> Connection:
        conn = self._conns.pop(addr, None)
        if conn is not None and not conn.closed:
            return conn
        return await self.node.open(addr)

    async def exchange(self, addr: str) -> Outcome:
        if self._busy:
            return Outcome(False, addr, "we are busy", busy=True)
        self._busy = True
        t0 = time.perf_counter()
        conn: Connection | None = None
        keep = False
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                # Snapshot first: it overlaps the responder's snapshot instead of following it.
                snap = await self.store.snapshot()
                norm = own_norm(snap)
                conn = await self._connect(addr)
                await conn.send(MsgType.EXCH_OFFER, self._offer())
                reply = await conn.recv()
                if reply.type != MsgType.EXCH_ACCEPT:
                    return self._declined(addr, reply)
                _, frame = await asyncio.gather(
                    conn.send(MsgType.EXCH_PAYLOAD, {}, [snap]), conn.recv()
                )
                keep = self.reuse  # the conversation ended cleanly: the stream is in sync
                await self._apply_fast(addr, snap, norm, frame)
                return Outcome(True, addr, seconds=time.perf_counter() - t0)
        except TimeoutError:
            return Outcome(False, addr, "exchange deadline passed")
        except (TransportError, OSError) as exc:
            return Outcome(False, addr, str(exc))
        except UpdateRejected as exc:
            self.rejected += 1
            return Outcome(False, addr, f"refused: {exc}")
        finally:
            self._busy = False
            if conn is not None:
                if keep:
                    self._conns[addr] = conn
                else:
                    conn.close()

    async def _apply_fast(self, addr: str, snap: np.ndarray, norm: float, frame: Frame) -> None:
        if frame.type != MsgType.EXCH_PAYLOAD or frame.payload.nbytes != snap.nbytes:
            raise UpdateRejected(f"{addr} sent a malformed payload")
        try:
            remote = np.frombuffer(frame.payload, dtype=np.float32)
            guard = self.config.guard
            limit = guard.max_relative_distance * norm + guard.absolute_floor
            if remote.nbytes < INLINE_MAX:
                delta = delta_in_place(remote, snap, limit)
            else:
                delta = await asyncio.to_thread(delta_in_place, remote, snap, limit)
            await self.store.mix_delta(delta)
            self.exchanges += 1
        finally:
            self.pool.give(frame.payload)

    async def _on_offer(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if h.get("schema") != self.store.schema or h.get("nbytes") != self.store.nbytes:
            await conn.send(MsgType.EXCH_DECLINE, {"incompatible": True, "reason": "schema"})
            return
        if self._busy or not self.ready:
            await conn.send(MsgType.EXCH_DECLINE, {"busy": True, "reason": "busy"})
            return
        self._busy = True
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                snap = await self.store.snapshot()
                norm = own_norm(snap)
                await conn.send(MsgType.EXCH_ACCEPT, {})
                _, payload = await asyncio.gather(
                    conn.send(MsgType.EXCH_PAYLOAD, {}, [snap]), conn.recv()
                )
                await self._apply_fast(conn.peer, snap, norm, payload)
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("refused weights from %s: %s", h.get("name"), exc)
        except (TimeoutError, TransportError, OSError):
            pass
        finally:
            self._busy = False


async def start_fast(size: int, seed: int, name: str, reuse: bool = False) -> FastExchanger:
    limits = PooledLimits()
    weights = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
    node = Node(TcpTransport(limits), name)
    await node.start("127.0.0.1", 0)
    return FastExchanger(node, FastStore(weights, f"bench-{size}"), limits.pool, reuse)


# -- the two roles ------------------------------------------------------------------------------
async def serve(size: int) -> None:
    exchanger = await start_fast(size, 1, "fast-responder")
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reader() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=reader, daemon=True).start()
    announce(exchanger.node.addr)
    try:
        async with asyncio.timeout(MAX_LIFETIME):
            await done.wait()
    finally:
        await exchanger.node.close()


async def _start_stock(size: int) -> Exchanger:
    weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    node = Node(TcpTransport(), "stock-initiator")
    await node.start("127.0.0.1", 0)
    return Exchanger(node, ArrayStore(weights, schema=f"bench-{size}"))


def compare(size: int, reps: int, warmup: int) -> dict[str, Any]:
    """Raw one-way, stock exchange and the prototype, interleaved round by round."""
    nbytes = 4 * size
    names = ("raw_one_way", "exchange", "proto_exchange", "proto_reuse")
    times: dict[str, list[float]] = {name: [] for name in names}
    with (
        Helper("_raw_peer.py", ["--size", str(size)]) as raw_peer,
        Helper("_responder.py", ["--size", str(size)]) as stock_peer,
        Helper("_proto_fast_exchange.py", ["--serve", "--size", str(size)]) as fast_peer,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        raw = RawClient(raw_peer.addr, nbytes, duplex=False)
        stock = runner.run(_start_stock(size))
        fast = runner.run(start_fast(size, 0, "fast-initiator"))
        reuse = runner.run(start_fast(size, 0, "reuse-initiator", reuse=True))
        try:
            for i in range(warmup + reps):
                sample = {
                    "raw_one_way": raw.round(),
                    "exchange": runner.run(timed_exchange(stock, stock_peer.addr)),
                    "proto_exchange": runner.run(timed_exchange(fast, fast_peer.addr)),
                    "proto_reuse": runner.run(timed_exchange(reuse, fast_peer.addr)),
                }
                if i >= warmup:
                    for k, v in sample.items():
                        times[k].append(v)
        finally:
            raw.close()
            runner.run(stock.node.close())
            runner.run(fast.node.close())
            runner.run(reuse.node.close())
    moved = {"raw_one_way": nbytes}
    methods = {k: method_result(v, moved.get(k, 2 * nbytes)) for k, v in times.items()}
    ceiling = methods["raw_one_way"]["mb_s_median"]
    return {
        "floats": size,
        "methods": methods,
        "vs_ceiling_median": {k: v["mb_s_median"] / ceiling for k, v in methods.items()},
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            f"{r['floats']:,}",
            name,
            f"{m['median_s'] * 1e3:.2f}",
            f"{m['best_s'] * 1e3:.2f}",
            f"{m['mb_s_median']:,.0f}",
            f"{r['vs_ceiling_median'][name]:.0%}",
        ]
        for r in results
        for name, m in r["methods"].items()
    ]
    headers = ["float32", "method", "median ms", "best ms", "MB/s (median)", "vs ceiling"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the prototype responder")
    parser.add_argument("--size", type=int, default=0, help="float32 values (with --serve)")
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve:
        uvloop.run(serve(args.size))
        return
    sizes = [65_536, 262_144] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    machine = machine_info()
    results = [compare(size, reps, warmup) for size in sizes]
    out = {"benchmark": "proto_fast_exchange", "machine": machine, "results": results}
    emit(out, [table(results)])


if __name__ == "__main__":
    main()
