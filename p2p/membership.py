"""The asyncio driver around ``p2p.swim.Swim``.

``Membership.run()`` owns everything: it sleeps until the state machine's next deadline or
until the transport delivers a message, handles the delivered messages first (an ack that
arrived during a stall must count before the timers that it would have stopped), then runs
``tick()`` and starts one task per outgoing message, each under ``send_timeout``. A failed or
late send is a lost packet, which SWIM is built to survive.

Local health: every timed wake-up measures how late the loop woke (the lag of a loop that
shares the process with training). The worst recent lag, decaying with a 10 s half-life,
becomes a health score through ``Swim.set_health``: one step per half probe timeout of lag.
Missed acks and nacks are counted inside ``Swim`` itself, as in memberlist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .swim import Out, Swim

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any]], Awaitable[None]]
EventCallback = Callable[[dict[str, Any]], None]

# Incoming messages buffered between two steps; more are dropped (a flood must not eat memory).
MAX_INBOX = 10_000
# Messages handled per step before the loop yields, so a burst cannot starve other tasks.
STEP_BATCH = 500
# Sends in flight at once; beyond this, new messages are dropped like packets on a full link.
MAX_SENDS = 1_000
# Half-life in seconds of the remembered event-loop lag.
LAG_HALF_LIFE = 10.0


class JoinError(ConnectionError):
    """No seed answered a join within the timeout."""


class Membership:
    """Runs one Swim on the current event loop. Start ``run()`` in a task, then ``join()``."""

    def __init__(
        self,
        swim: Swim,
        send: Send,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventCallback | None = None,
    ) -> None:
        self.swim = swim
        self.on_event = on_event
        self._send = send
        self._clock = clock
        self._inbox: deque[Any] = deque()
        self._wake = asyncio.Event()
        self._joined = asyncio.Event()
        self._left = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._outbox: list[Out] = []  # sent by run() once it starts
        self._started = False
        self._stop = False
        self._lag = 0.0
        self._lag_at = clock()
        # The driver's share of the health score, from event-loop lag.
        self.lag_score = 0
        self._inflight = 0
        self._warned: set[str] = set()
        self.sends_failed = 0
        self.dropped_in = 0

    # -- transport side -----------------------------------------------------------------

    def deliver(self, msg: dict[str, Any]) -> None:
        """Hand over one incoming SWIM message (never blocks; drops when the inbox is full)."""
        if len(self._inbox) >= MAX_INBOX:
            self.dropped_in += 1
            self._warn_once("inbox", "membership inbox full (%d); dropping messages", MAX_INBOX)
            return
        self._inbox.append(msg)
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the state machine until leave() completes or the task is cancelled."""
        if self._started:
            raise RuntimeError("Membership.run() runs once")
        self._started = True
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._dispatch(self._outbox)
                self._outbox = []
                while not self._stop:
                    await self._sleep_until(self.swim.next_deadline())
                    self._step()
                    await asyncio.sleep(0)  # let sends and other tasks run between steps
        finally:
            self._group = None

    async def join(self, seeds: list[str], timeout: float) -> None:
        """Join through any of ``seeds`` ("host:port"); the first answer wins.

        Raises JoinError if none answers within ``timeout`` seconds. run() must be running
        (or about to: a task created just before is fine).
        """
        if not seeds:
            raise ValueError("join() needs at least one seed address")
        self._dispatch(self.swim.join(seeds, self._clock()))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._joined.wait()
        except TimeoutError:
            self._require_running()
            listed = ", ".join(seeds)
            raise JoinError(f"no peer answered at {listed} within {timeout} s") from None

    def rejoin(self, seeds: list[str]) -> None:
        """Join again through ``seeds`` (fresh addresses of a DNS name) without waiting: for
        a member that has nobody alive left. The next reply merges us into their group."""
        self._dispatch(self.swim.rejoin(seeds, self._clock()))
        self._wake.set()

    async def leave(self, timeout: float) -> None:
        """Announce a graceful leave, wait up to ``timeout`` s for it to spread, stop run()."""
        self._dispatch(self.swim.leave(self._clock()))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._left.wait()
        except TimeoutError:
            log.warning("%s: leave not fully announced within %s s", self.swim.name, timeout)
        finally:
            self._stop = True
            self._wake.set()

    def set_meta(self, meta: str) -> None:
        """Say ``meta`` about ourselves (see ``Swim.set_meta``); it goes out with the next
        gossip round."""
        self.swim.set_meta(meta)
        self._wake.set()

    def alive_addrs(self) -> list[tuple[str, str]]:
        """(name, addr) of every member not known dead or left, self excluded."""
        return [(m.name, m.addr) for m in self.swim.alive()]

    # -- the loop -----------------------------------------------------------------------

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - self._clock()
        if self._inbox or delay <= 0:
            self._note_lag(max(0.0, -delay))
            return
        self._wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            self._note_lag(max(0.0, self._clock() - deadline))
        else:
            self._note_lag(0.0)  # woken by a message: nothing measured, the old lag decays

    def _step(self) -> None:
        now = self._clock()
        outs: list[Out] = []
        for _ in range(min(len(self._inbox), STEP_BATCH)):
            outs += self.swim.on_message(self._inbox.popleft(), now)
        outs += self.swim.tick(now)
        self._dispatch(outs)
        self._emit_events()
        if self.swim.joined():
            self._joined.set()
        if self.swim.leave_done():
            self._left.set()

    def _emit_events(self) -> None:
        for event in self.swim.drain_events():
            log.debug("%s: %s", self.swim.name, event)
            if self.on_event is None:
                continue
            try:
                self.on_event(event)
            except Exception:
                log.exception("%s: membership event callback failed", self.swim.name)

    def _note_lag(self, lag: float) -> None:
        """Remember the worst recent lag; turn it into the driver's share of the health score."""
        now = self._clock()
        decay = 0.5 ** (max(0.0, now - self._lag_at) / LAG_HALF_LIFE)
        self._lag = max(lag, self._lag * decay)
        self._lag_at = now
        # One step per half probe timeout: a lag that eats half the time an ack is given
        # doubles the timeouts, so our own slowness is not taken for a dead peer.
        top = self.swim.config.awareness_max_multiplier - 1
        score = min(top, int(self._lag / (self.swim.config.probe_timeout / 2)))
        if score != self.lag_score:
            if score > self.lag_score:
                log.info(
                    "%s: event loop lagged %.3f s; health score %d", self.swim.name, lag, score
                )
            self.lag_score = score
            self.swim.set_health(score)

    # -- sending ------------------------------------------------------------------------

    def _dispatch(self, outs: list[Out]) -> None:
        group = self._group
        if group is None:
            self._outbox.extend(outs)
            return
        for addr, msg in outs:
            if self._inflight >= MAX_SENDS:
                self.sends_failed += 1
                self._warn_once("sends", "%d membership sends in flight; dropping", MAX_SENDS)
                continue
            self._inflight += 1
            group.create_task(self._send_one(addr, msg))

    async def _send_one(self, addr: str, msg: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.swim.config.send_timeout):
                await self._send(addr, msg)
        except Exception as e:  # a lost packet: SWIM's timers deal with it
            self.sends_failed += 1
            log.debug("%s: send %s to %s failed: %r", self.swim.name, msg.get("type"), addr, e)
        finally:
            self._inflight -= 1

    def _require_running(self) -> None:
        if not self._started:
            raise RuntimeError("Membership.run() was never started")

    def _warn_once(self, key: str, fmt: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + fmt, self.swim.name, *args)
