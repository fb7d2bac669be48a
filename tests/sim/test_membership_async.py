"""The asyncio driver (p2p.membership) on a tiny in-process network.

Real event loop, real time, the test() profile (a dead peer is found in about a second).
Sends go through msgpack, so nothing that could not cross a wire gets through.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest

from p2p.membership import MAX_INBOX, JoinError, Membership
from p2p.swim import Swim, SwimConfig

CFG = SwimConfig.test()


class FakeNet:
    """One-way delivery between Memberships. A 'down' peer refuses (the send raises); a
    'paused' peer accepts and never answers (the send hangs until its deadline)."""

    def __init__(self) -> None:
        self.peers: dict[str, Membership] = {}
        self.down: set[str] = set()
        self.paused: set[str] = set()

    def sender(self, src: str) -> Callable[[str, dict[str, Any]], Any]:
        async def send(addr: str, msg: dict[str, Any]) -> None:
            if src in self.down or addr in self.down or addr not in self.peers:
                raise ConnectionRefusedError(addr)
            if addr in self.paused or src in self.paused:
                await asyncio.Event().wait()  # hangs: only the driver's deadline ends it
            await asyncio.sleep(0)
            self.peers[addr].deliver(msgpack.unpackb(msgpack.packb(msg), raw=False))

        return send


class Swarm:
    def __init__(self, net: FakeNet) -> None:
        self.net = net
        self.members: dict[str, Membership] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str) -> Membership:
        addr = f"{name}:1"
        swim = Swim(name, addr, CFG, random.Random(name), time.monotonic())
        self.events[name] = []
        m = Membership(swim, self.net.sender(addr), on_event=self.events[name].append)
        self.net.peers[addr] = m
        self.members[name] = m
        self.tasks[name] = asyncio.create_task(m.run())
        return m

    async def stop(self, name: str) -> None:
        """SIGKILL: the task dies, messages to it are refused."""
        self.net.down.add(f"{name}:1")
        task = self.tasks.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def seen(self, observer: str, kind: str, subject: str) -> bool:
        return any(e["kind"] == kind and e["subject"] == subject for e in self.events[observer])


@asynccontextmanager
async def swarm(names: list[str]) -> AsyncIterator[Swarm]:
    s = Swarm(FakeNet())
    for name in names:
        s.start(name)
    await asyncio.sleep(0)
    try:
        for name in names[1:]:
            await s.members[name].join([f"{names[0]}:1"], timeout=5.0)
        yield s
    finally:
        tasks = list(s.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_peers_join_and_see_each_other() -> None:
    names = ["a", "b", "c", "d"]
    async with swarm(names) as s:
        await until(lambda: all(len(s.members[n].alive_addrs()) == 3 for n in names), 5.0)
        assert sorted(s.members["a"].alive_addrs()) == [("b", "b:1"), ("c", "c:1"), ("d", "d:1")]
        assert s.seen("d", "joined", "a") and s.seen("a", "joined", "d")
        assert all(isinstance(e["t"], float) for e in s.events["a"])


async def test_join_error_names_every_seed() -> None:
    s = Swarm(FakeNet())
    m = s.start("lonely")
    try:
        with pytest.raises(JoinError, match=r"no peer answered at x:1, y:2 within 0.3 s"):
            await m.join(["x:1", "y:2"], timeout=0.3)
        assert m.sends_failed >= 2  # refused sends are counted, never raised
    finally:
        await s.stop("lonely")


async def test_join_without_a_driver_says_so() -> None:
    swim = Swim("a", "a:1", CFG, random.Random(0), time.monotonic())
    m = Membership(swim, FakeNet().sender("a:1"))
    with pytest.raises(RuntimeError, match="never started"):
        await m.join(["b:1"], timeout=0.1)


async def test_first_seed_that_answers_wins() -> None:
    async with swarm(["a", "b"]) as s:
        c = s.start("c")
        await c.join(["nowhere:9", "b:1"], timeout=5.0)
        assert c.swim.joined()


async def test_killed_peer_is_declared_dead() -> None:
    names = ["a", "b", "c", "d"]
    async with swarm(names) as s:
        await until(lambda: all(len(s.members[n].alive_addrs()) == 3 for n in names), 5.0)
        await s.stop("c")
        await until(lambda: all(s.seen(n, "declared_dead", "c") for n in "abd"), 10.0)
        assert [n for n, _ in s.members["a"].alive_addrs()] in (["b", "d"], ["d", "b"])
        deaths = {e["subject"] for n in "abd" for e in s.events[n] if e["kind"] == "declared_dead"}
        assert deaths == {"c"}


async def test_paused_peer_is_declared_dead_and_sends_do_not_block() -> None:
    names = ["a", "b", "c"]
    async with swarm(names) as s:
        await until(lambda: all(len(s.members[n].alive_addrs()) == 2 for n in names), 5.0)
        s.net.paused.add("b:1")
        await until(lambda: s.seen("a", "declared_dead", "b"), 10.0)
        assert s.members["a"].sends_failed > 0  # the hung sends timed out


async def test_leave_is_announced_as_left() -> None:
    names = ["a", "b", "c"]
    async with swarm(names) as s:
        await until(lambda: all(len(s.members[n].alive_addrs()) == 2 for n in names), 5.0)
        await s.members["b"].leave(timeout=3.0)
        async with asyncio.timeout(3.0):
            await s.tasks["b"]  # run() returns after a leave
        await until(lambda: s.seen("a", "left", "b") and s.seen("c", "left", "b"), 5.0)
        assert not s.seen("a", "declared_dead", "b")
        assert s.members["a"].alive_addrs() == [("c", "c:1")]


async def test_event_loop_lag_stretches_timeouts() -> None:
    async with swarm(["a", "b"]) as s:
        a = s.members["a"]
        await until(lambda: bool(a.alive_addrs()), 5.0)
        assert a.lag_score == 0
        for _ in range(3):
            time.sleep(0.25)  # holds the loop, as a step that keeps the GIL would
            await asyncio.sleep(0.05)
        assert a.lag_score >= 1
        assert a.swim.health >= 1


async def test_garbage_and_a_faulty_callback_do_not_stop_the_driver() -> None:
    async with swarm(["a", "b"]) as s:
        a = s.members["a"]

        def boom(event: dict[str, Any]) -> None:
            raise ValueError("callback bug")

        a.on_event = boom
        for junk in (None, {"type": "teleport", "from": "x", "addr": "x:1"}, {"type": 1}):
            a.deliver(junk)  # type: ignore[arg-type]
        c = s.start("c")
        await c.join(["b:1"], timeout=5.0)
        await until(lambda: ("c", "c:1") in a.alive_addrs(), 5.0)
        assert sum(a.swim.rejected.values()) == 3
        assert not s.tasks["a"].done()


async def test_a_flood_of_incoming_messages_is_bounded() -> None:
    swim = Swim("a", "a:1", CFG, random.Random(0), time.monotonic())
    m = Membership(swim, FakeNet().sender("a:1"))
    for i in range(MAX_INBOX + 10):
        m.deliver({"type": "gossip", "from": "x", "addr": "x:1", "updates": [], "i": i})
    assert m.dropped_in == 10
