"""A deterministic discrete-event simulator for ``p2p.swim``.

Many ``Swim`` peers share one fake clock and an in-memory network with per-message delay,
loss, partitions, and kill / pause / resume / restart of peers. Everything random comes from
seeded ``random.Random`` objects, so one seed gives one history. Used by tests/sim/test_swim_sim.py
and benchmarks/swim_dissemination.py.

The event queue is a heap of ``(time, seq, kind, peer, payload)``; ``seq`` breaks ties in
insertion order. A peer's tick is scheduled at its ``next_deadline()`` and rescheduled after
every message; a popped tick whose time no longer matches the schedule is stale and skipped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from .swim import Out, State, Swim, SwimConfig

log = logging.getLogger(__name__)

_DELIVER = 0
_TICK = 1

# Messages held for one paused peer; beyond this they are lost, like a full socket buffer.
MAX_HELD = 10_000


@dataclass(frozen=True)
class NetConfig:
    # One-way latency floor in seconds. Default 0.5 ms, a LAN.
    delay: float = 0.0005
    # Extra latency, uniform in [0, jitter] seconds, so messages can overtake each other.
    # Default 1 ms.
    jitter: float = 0.001
    # Probability that any one message is lost. Default 0.
    drop: float = 0.0
    # Round-trip every message through msgpack, proving it is wire-safe; costs time at
    # large N. Default True.
    wire_check: bool = True


class Simulation:
    """N Swim peers on a fake clock. Peers are named ``p0, p1, ...`` unless named by the caller."""

    def __init__(self, config: SwimConfig, seed: int = 0, net: NetConfig | None = None) -> None:
        self.config = config
        self.net = net or NetConfig()
        self.seed = seed
        self.now = 0.0
        self._rng = random.Random(f"net/{seed}")
        self._heap: list[tuple[float, int, int, str, Any]] = []
        self._counter = itertools.count()
        self.nodes: dict[str, Swim] = {}
        self.addr_of: dict[str, str] = {}
        self._by_addr: dict[str, str] = {}
        # "up", "paused", "leaving" (still gossiping its leave), "left" or "killed".
        self.status: dict[str, str] = {}
        self._tick_at: dict[str, float] = {}
        self._held: dict[str, list[tuple[str, Any]]] = {}
        self._group: dict[str, int] = {}
        # Every event of every peer, each with "at": the peer that saw it.
        self.events: list[dict[str, Any]] = []
        # declared_dead events about a peer that was up and reachable from the observer.
        self.false_deaths: list[dict[str, Any]] = []
        self.sent: Counter[str] = Counter()
        self.sent_total = 0
        # msgpack bytes of all messages sent; counted only with NetConfig.wire_check.
        self.bytes_total = 0
        self.dropped = 0

    # -- building the group -------------------------------------------------------------

    def add(
        self, name: str | None = None, *, seeds: Iterable[str] = (), incarnation: int = 0
    ) -> str:
        """Start a peer now; it joins through ``seeds`` (names of peers) if any."""
        index = len(self.addr_of)
        name = name or f"p{index}"
        if name in self.addr_of:
            raise ValueError(f"peer {name} exists; use restart()")
        addr = f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}:7946"
        self.addr_of[name] = addr
        self._by_addr[addr] = name
        self._start(name, incarnation)
        seed_addrs = [self.addr_of[s] for s in seeds]
        if seed_addrs:
            self._after(name, self.nodes[name].join(seed_addrs, self.now))
        return name

    def add_converged(self, n: int) -> list[str]:
        """Start ``n`` peers that already know each other (no join traffic)."""
        names = [self.add() for _ in range(n)]
        everyone = [(nm, self.addr_of[nm], 0) for nm in names]
        for nm in names:
            self.nodes[nm].preload(everyone, self.now)
        return names

    def _start(self, name: str, incarnation: int) -> None:
        rng = random.Random(f"{self.seed}/{name}/{incarnation}")
        swim = Swim(name, self.addr_of[name], self.config, rng, self.now, incarnation)
        self.nodes[name] = swim
        self.status[name] = "up"
        self._tick_at[name] = math.inf
        self._schedule(name)

    # -- faults -------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL: the peer stops at once; messages to it are lost."""
        self.status[name] = "killed"
        self._tick_at[name] = math.inf
        self._held.pop(name, None)

    def pause(self, name: str) -> None:
        """SIGSTOP: no timers run; messages to it wait (up to MAX_HELD) until resume()."""
        self.status[name] = "paused"
        self._tick_at[name] = math.inf

    def resume(self, name: str) -> None:
        """SIGCONT: the held messages are handled first, then whatever timers are overdue."""
        self.status[name] = "up"
        for src, msg in self._held.pop(name, []):
            self._deliver(src, name, msg)
        self._run_tick(name)

    def restart(self, name: str, seeds: Iterable[str] = ()) -> None:
        """A fresh process under the same name and address and a higher incarnation."""
        inc = self.nodes[name].incarnation + 1
        self._held.pop(name, None)
        self._start(name, inc)
        seed_addrs = [self.addr_of[s] for s in seeds]
        if seed_addrs:
            self._after(name, self.nodes[name].join(seed_addrs, self.now))

    def leave(self, name: str) -> None:
        """Graceful leave: the peer keeps gossiping until its news is out, then stops."""
        self.status[name] = "leaving"
        self._after(name, self.nodes[name].leave(self.now))

    def partition(self, *groups: Iterable[str]) -> None:
        """Peers in different groups cannot talk; peers in no group form one more group."""
        self._group = {name: i + 1 for i, group in enumerate(groups) for name in group}

    def heal(self) -> None:
        self._group = {}

    def reachable(self, a: str, b: str) -> bool:
        return self._group.get(a, 0) == self._group.get(b, 0)

    # -- running ------------------------------------------------------------------------

    def run(self, until: float) -> None:
        """Process everything due up to ``until``; the clock then reads ``until``."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, kind, name, payload = heapq.heappop(heap)
            self.now = t
            if kind == _DELIVER:
                src, msg = payload
                self._deliver(src, name, msg)
            elif self._tick_at.get(name) == t:
                self._run_tick(name)
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run(self.now + seconds)

    def run_until(self, done: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
        """Run in steps of ``step`` until ``done()`` or ``timeout`` seconds have passed."""
        end = self.now + timeout
        while not done():
            if self.now >= end:
                return False
            self.run(min(end, self.now + step))
        return True

    def _run_tick(self, name: str) -> None:
        self._tick_at[name] = math.inf
        node = self.nodes[name]
        self._after(name, node.tick(self.now))
        if self.status[name] == "leaving" and node.leave_done():
            self.status[name] = "left"
            self._tick_at[name] = math.inf

    def _deliver(self, src: str, dst: str, msg: Any) -> None:
        status = self.status[dst]
        if status in ("killed", "left") or not self.reachable(src, dst):
            self.dropped += 1
        elif status == "paused":
            held = self._held.setdefault(dst, [])
            if len(held) < MAX_HELD:
                held.append((src, msg))
        else:
            self._after(dst, self.nodes[dst].on_message(msg, self.now))

    def _after(self, name: str, outs: list[Out]) -> None:
        """Send a peer's output, record its events, reschedule its tick."""
        for addr, msg in outs:
            self._send(name, addr, msg)
        for event in self.nodes[name].drain_events():
            self._record(name, event)
        if self.status[name] in ("up", "leaving"):
            self._schedule(name)

    def _send(self, src: str, addr: str, msg: dict[str, Any]) -> None:
        self.sent[src] += 1
        self.sent_total += 1
        if self.net.wire_check:
            data = msgpack.packb(msg)
            self.bytes_total += len(data)
            msg = msgpack.unpackb(data, raw=False)
        dst = self._by_addr.get(addr)
        if dst is None or not self.reachable(src, dst) or self._rng.random() < self.net.drop:
            self.dropped += 1
            return
        t = self.now + self.net.delay + self._rng.random() * self.net.jitter
        heapq.heappush(self._heap, (t, next(self._counter), _DELIVER, dst, (src, msg)))

    def _schedule(self, name: str) -> None:
        t = max(self.nodes[name].next_deadline(), self.now)
        if t < self._tick_at[name]:
            self._tick_at[name] = t
            heapq.heappush(self._heap, (t, next(self._counter), _TICK, name, None))

    def _record(self, name: str, event: dict[str, Any]) -> None:
        event["at"] = name
        self.events.append(event)
        if event["kind"] != "declared_dead":
            return
        subject = event["subject"]
        if self.status.get(subject) == "up" and self.reachable(name, subject):
            log.warning("false death: %s declared %s dead at %.2f", name, subject, self.now)
            self.false_deaths.append(event)

    # -- views --------------------------------------------------------------------------

    def up(self) -> list[str]:
        return [n for n, s in self.status.items() if s == "up"]

    def state(self, observer: str, subject: str) -> State | None:
        return self.nodes[observer].state_of(subject)

    def converged(self, peers: Iterable[str] | None = None) -> bool:
        """Every given peer (default: all up) sees exactly the other given peers as live."""
        group = set(self.up() if peers is None else peers)
        for name in group:
            live = set(self.nodes[name].live_names())
            if live != group - {name}:
                return False
        return True

    def agree(self, subject: str, state: State, observers: Iterable[str] | None = None) -> bool:
        """Every observer (default: all up but the subject) has ``subject`` in ``state``."""
        names = self.up() if observers is None else list(observers)
        return all(self.state(n, subject) == state for n in names if n != subject)

    def event_times(self, kind: str, subject: str) -> dict[str, float]:
        """First time each peer reported ``kind`` about ``subject``."""
        seen: dict[str, float] = {}
        for ev in self.events:
            if ev["kind"] == kind and ev["subject"] == subject:
                seen.setdefault(ev["at"], ev["t"])
        return seen
