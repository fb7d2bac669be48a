"""Prototype check: the TCP transport alone, with and without reused receive buffers.

Both sides of one established ``TcpTransport`` connection send a ``--size`` float32 frame
at the same time (as an exchange does), round after round, under uvloop. ``stock`` receives
with the committed decoder (a fresh ``bytearray`` per frame); ``pooled`` with the decoder of
``_proto_fast_exchange.py`` (a buffer reused across frames). No snapshot, check or mix: this
is the ceiling of the framing + transport layer, to set against the raw-socket numbers.

    .venv/bin/python benchmarks/_proto_pooled_transport.py --sizes 1000000,10000000
    .venv/bin/python benchmarks/_proto_pooled_transport.py --serve --size N --pooled  # peer
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from typing import Any

import numpy as np
import uvloop
from _proto_fast_exchange import PooledLimits
from common import Helper, announce, emit, machine_info, markdown_table, summarize

from p2p.framing import Frame, Limits, MsgType
from p2p.transport import Connection, TcpTransport

MAX_LIFETIME = 3600.0  # the serving process never outlives this


def _limits(pooled: bool) -> Limits:
    return PooledLimits() if pooled else Limits()


def _release(limits: Limits, frame: Frame) -> None:
    if isinstance(limits, PooledLimits):
        limits.pool.give(frame.payload)


async def _duplex(conn: Connection, limits: Limits, data: np.ndarray) -> None:
    _, frame = await asyncio.gather(conn.send(MsgType.EXCH_PAYLOAD, {}, [data]), conn.recv())
    if frame.payload.nbytes != data.nbytes:
        raise RuntimeError("short frame")
    _release(limits, frame)


async def serve(size: int, pooled: bool) -> None:
    limits = _limits(pooled)
    transport = TcpTransport(limits)
    data = np.ones(size, dtype=np.float32)

    async def handler(conn: Connection) -> None:
        while True:
            await _duplex(conn, limits, data)

    host, port = await transport.listen("127.0.0.1", 0, handler)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reader() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=reader, daemon=True).start()
    announce(f"{host}:{port}")
    try:
        async with asyncio.timeout(MAX_LIFETIME):
            await done.wait()
    finally:
        await transport.close()


async def rounds(addr: str, size: int, pooled: bool, reps: int, warmup: int) -> list[float]:
    limits = _limits(pooled)
    transport = TcpTransport(limits)
    data = np.ones(size, dtype=np.float32)
    conn = await transport.connect(addr, 5.0)
    times = []
    try:
        async with asyncio.timeout(60.0 + reps * size * 1e-7):
            for i in range(warmup + reps):
                t0 = time.perf_counter()
                await _duplex(conn, limits, data)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        conn.close()
        await transport.close()
    return times


def measure(size: int, pooled: bool, reps: int, warmup: int) -> dict[str, Any]:
    flags = ["--serve", "--size", str(size), *(["--pooled"] if pooled else [])]
    with Helper("_proto_pooled_transport.py", flags) as peer:
        times = uvloop.run(rounds(peer.addr, size, pooled, reps, warmup))
    s = summarize(times)
    return {
        "floats": size,
        "decoder": "pooled" if pooled else "stock",
        **s.as_dict(),
        "goodput_mb_s_median": 2 * 4 * size / s.median / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--pooled", action="store_true", help="with --serve")
    parser.add_argument("--size", type=int, default=0, help="with --serve")
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.size, args.pooled))
        return
    sizes = [262_144] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    machine = machine_info()
    rows = [measure(size, pooled, reps, warmup) for size in sizes for pooled in (False, True)]
    table = markdown_table(
        ["float32", "decoder", "median ms", "best ms", "duplex goodput MB/s (median)"],
        [
            [
                f"{r['floats']:,}",
                r["decoder"],
                f"{r['median_s'] * 1e3:.2f}",
                f"{r['best_s'] * 1e3:.2f}",
                f"{r['goodput_mb_s_median']:,.0f}",
            ]
            for r in rows
        ],
    )
    emit({"benchmark": "proto_pooled_transport", "machine": machine, "results": rows}, [table])


if __name__ == "__main__":
    main()
