"""Exchange responder for the exchange benchmark: a started Node with an Exchanger on it.

It listens on 127.0.0.1 (a free port), prints ``READY host:port`` and answers push-pull
exchanges of ``--size`` float32 values until its stdin closes, under uvloop. With
``--profile PATH`` it runs under cProfile and writes the stats there on exit; with
``--phases`` it times the phases of every exchange it answers and prints
``PHASES <json>`` (median milliseconds per phase) on exit.

    python benchmarks/_responder.py --size 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import sys
import threading
import time

import numpy as np
import uvloop
from _phases import PhaseClock, instrument
from common import announce

from gossip.exchange import Exchanger
from gossip.store import ArrayStore
from p2p.framing import Frame, MsgType
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring
from p2p.transport import Connection, TcpTransport

log = logging.getLogger(__name__)

# Longest a responder may live; the parent closes our stdin long before this.
MAX_LIFETIME = 3600.0


def watch_stdin(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
    """Set ``done`` (on the loop) once stdin reaches EOF: the parent is finished or gone."""

    def reader() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=reader, daemon=True).start()


def time_answers(exchanger: Exchanger, clock: PhaseClock) -> None:
    """Time each answered offer as one round of ``clock``."""
    instrument(exchanger, clock)
    handlers = exchanger.node.handlers
    answer = handlers[MsgType.EXCH_OFFER]

    async def timed(conn: Connection, frame: Frame) -> None:
        t0 = time.perf_counter()
        await answer(conn, frame)
        clock.end_round(time.perf_counter() - t0)

    handlers[MsgType.EXCH_OFFER] = timed


async def serve(
    size: int, seed: int, clock: PhaseClock | None, secret_file: str | None = None
) -> int:
    weights = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
    keyring = Keyring.from_file(secret_file) if secret_file else None
    node = Node(TcpTransport(), "responder", NodeConfig(keyring=keyring))
    exchanger = Exchanger(node, ArrayStore(weights, schema=f"bench-{size}"))
    if clock is not None:
        time_answers(exchanger, clock)
    host, port = await node.start("127.0.0.1", 0)
    done = asyncio.Event()
    watch_stdin(asyncio.get_running_loop(), done)
    announce(f"{host}:{port}")
    try:
        async with asyncio.timeout(MAX_LIFETIME):
            await done.wait()
    finally:
        await node.close()
    return exchanger.exchanges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, required=True, help="float32 values in the model")
    parser.add_argument("--seed", type=int, default=1, help="seed of the initial weights")
    parser.add_argument("--profile", default="", help="write cProfile stats to this path")
    parser.add_argument("--phases", action="store_true", help="print phase timings on exit")
    parser.add_argument("--secret-file", help="a keyring: every connection sealed (p2p.secure)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    clock = PhaseClock() if args.phases else None
    exchanges = uvloop.run(serve(args.size, args.seed, clock, args.secret_file))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    if clock is not None:
        print("PHASES " + json.dumps(clock.medians_ms()), flush=True)
    log.info("answered %d exchanges", exchanges)


if __name__ == "__main__":
    main()
