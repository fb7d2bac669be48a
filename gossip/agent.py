"""The gossip agent: everything a peer does on the network, with no torch in sight.

It joins a swarm through any known address, catches up from a live neighbour, averages its
weights with live neighbours while the owner trains (one exchange per period of steps, in
``partner_order``, within the CPU budget), lingers after training while others still train,
and leaves gracefully. It works on a ``WeightStore`` (a flat float32 vector and its lock), so
the same agent serves the torch trainer (``trainer.peer``), the public ``GossipOptimizer``,
and simulations and benchmarks over plain arrays.

Lifecycle::

    async with Agent(config, store, transport, events) as agent:   # start(): bind, join,
        ...train, calling agent.stepped() after each step...        # catch up, gossip
        await agent.linger(step_seconds)                            # until nobody trains
    # leaving the block: leave() (graceful, announced), then close() (bounded, then cancel)

``abort()`` stops at once, with no leave: for a peer that must stop now.

Membership carries each member's phase as its meta: ``""`` while starting or training,
``"finished"`` once its last step is done. A lingering peer leaves as soon as every live
member it sees has finished, so a run ends when its work does, with ``linger_seconds`` as
the upper bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2p import dns
from p2p.framing import Frame, MsgType
from p2p.membership import JoinError, Membership
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring
from p2p.swim import Swim, SwimConfig
from p2p.transport import Connection, Transport, TransportError, parse_addr

from .events import Events
from .exchange import Exchanger, GossipConfig, IncompatiblePeer, Outcome, WeightStore
from .policy import (
    MAX_BUDGET_WAIT,
    CpuBudget,
    PeriodClock,
    ScheduleConfig,
    linger_interval,
    partner_order,
)

log = logging.getLogger(__name__)

PROFILES: dict[str, Callable[[], SwimConfig]] = {
    "local": SwimConfig.local,
    "lan": SwimConfig.lan,
    "wan": SwimConfig.wan,
    "test": SwimConfig.test,
}
FINISHED = "finished"  # the meta of a member that has trained its last step
# Seconds a graceful leave may take to spread, and close() to end its tasks.
LEAVE_TIMEOUT = 2.0
CLOSE_TIMEOUT = 5.0
ABORT_TIMEOUT = 0.5
# Longest a neighbour whose exchanges keep failing is tried last, in seconds.
UNREACHABLE_MAX_BACKOFF = 30.0
# Rounds a peer tries for its one exchange after every member has finished.
LAST_EXCHANGE_ROUNDS = 3
# A busy round is tried again after a random 1/4 to 3/4 of a typical exchange's time (the
# moving average of ours), that time taken within these bounds, in seconds.
BUSY_RETRY_MIN = 0.004
BUSY_RETRY_MAX = 0.2
# Seconds between resolutions of ``dns:`` seeds while the name has no records yet, and
# between re-resolutions while no member is alive.
RESOLVE_RETRY = 1.0
REDISCOVER_SECONDS = 2.0


class AgentError(Exception):
    """A fatal, user-facing problem (bad address, nobody to join, incompatible swarm)."""


@dataclass(frozen=True)
class AgentConfig:
    # Unique member name; defaults to the advertised address.
    name: str = ""
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    join: tuple[str, ...] = ()
    join_timeout: float = 10.0
    cluster: str = "gossip-train"
    profile: str = "local"
    # Upper bound on lingering after training (0: leave at once).
    linger_seconds: float = 0.0
    # A fresh peer waits (up to join_timeout) until this many peers, itself included, are
    # members before it trains, so a short run does not end before its swarm has formed.
    # 0 or 1: start at once. A resumed peer never waits: its swarm may be gone.
    wait_peers: int = 0
    # The swarm's keyring file (p2p.secure); None: connections are not authenticated.
    secret_file: str | None = None
    seed: int = 0
    gossip: GossipConfig = field(default_factory=GossipConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        store: WeightStore,
        transport: Transport,
        events: Events | None = None,
        *,
        incarnation: int = 0,
        resumed: bool = False,
        step: Callable[[], int] = lambda: 0,
        load: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.events = events or Events()
        self.incarnation = incarnation
        self.resumed = resumed  # a restarted peer: its weights are stale, its swarm may be gone
        self._load = load or self._load_array
        self.rng = random.Random(config.seed)
        keyring = Keyring.from_file(config.secret_file) if config.secret_file else None
        node_config = NodeConfig(cluster=config.cluster, keyring=keyring)
        self.node = Node(transport, config.name or "?", node_config)
        self.exchanger = Exchanger(self.node, store, config.gossip)
        self.exchanger.step_fn = step
        self.exchanger.on_event = self.emit  # refusals and quarantines of robust mixing
        self.membership: Membership | None = None
        self.status = "starting"
        self.exchange_seconds = 0.0
        self.lingered: float | None = None
        self.linger_reason = ""
        self._partnered: set[str] = set()
        # Neighbours whose last exchange failed: address -> (tried last until, back-off).
        self._unreachable: dict[str, tuple[float, float]] = {}
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failed: asyncio.Future[BaseException] | None = None
        self._clock: PeriodClock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_exchange_seen = False
        self._left = False
        self._closed = False
        self.t0 = time.monotonic()
        self.handlers = self.node.handlers  # more message types (status, control) go here
        # Told every exchange this agent starts (monitoring: its latency histogram).
        self.on_exchange: Callable[[Outcome], None] = lambda out: None

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Agent:
        if self._failed is None:  # not started yet
            await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            await self.leave()
            await self.close()
        else:
            await self.abort()  # cancelled or interrupted: no time for ceremony

    async def start(self, seeds: list[str] | None = None) -> None:
        """Bind, join through ``seeds`` (default: the configured ones), catch up, gossip."""
        if self._failed is not None:
            raise RuntimeError("Agent.start() runs once")
        self._loop = asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        await self._start_node()
        assert self.membership is not None
        self._spawn(self.membership.run(), "membership")
        await asyncio.sleep(0)  # let the driver start before join() needs it
        await self._join(list(self.config.join) if seeds is None else seeds)
        await self._assemble()
        await self._catch_up()
        self._clock = PeriodClock(
            self.config.schedule.period_steps, random.Random(self.rng.random())
        )
        self._spawn(self._gossip_loop(), "gossip")
        self.status = "training"

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Stop sharing weights and announce a graceful leave (bounded by ``timeout``)."""
        self.exchanger.ready = False
        if self._left or self.membership is None:
            return
        self._left = True
        with contextlib.suppress(Exception):
            await self.membership.leave(timeout)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End every task (waiting up to ``timeout`` for them), close connections and port."""
        if self._closed:
            return
        self._closed = True
        self.exchanger.ready = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning("agent task %s did not end within %.0f s", task.get_name(), timeout)
        self.exchanger.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.node.close()

    async def abort(self) -> None:
        """Stop now: no leave (the others will declare us dead), tasks cancelled, the port
        closed, all within ``ABORT_TIMEOUT``."""
        self._left = True
        await self.close(ABORT_TIMEOUT)

    async def failure(self) -> BaseException:
        """Wait until one of the agent's tasks fails; return its exception."""
        assert self._failed is not None, "start() first"
        return await asyncio.shield(self._failed)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"agent-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failed is not None and not self._failed.done():
            log.error("agent task %s failed: %s", task.get_name(), exc)
            self._failed.set_result(exc)

    # -- joining ---------------------------------------------------------------------------------
    async def _start_node(self) -> None:
        host, port = parse_addr(self.config.listen)
        try:
            await self.node.start(host, port, self.config.advertise)
        except TransportError as exc:
            raise AgentError(str(exc)) from None
        if not self.config.name:
            self.node.name = self.node.addr
        self.events.name = self.node.name
        swim = Swim(
            self.node.name,
            self.node.addr,
            PROFILES[self.config.profile](),
            self.rng,
            time.monotonic(),
            incarnation=self.incarnation,
        )
        self.membership = Membership(swim, self._send_swim)
        self.membership.on_event = self._on_member_event
        self.node.handlers[MsgType.SWIM] = self._on_swim
        self.emit("listening", addr=self.node.addr, name=self.node.name)
        log.info("peer %s listening on %s", self.node.name, self.node.addr)

    async def _send_swim(self, addr: str, msg: dict[str, Any]) -> None:
        await self.node.send_oneway(addr, MsgType.SWIM, msg)

    async def _on_swim(self, conn: Connection, frame: Frame) -> None:
        assert self.membership is not None
        self.membership.deliver(frame.header)

    def _on_member_event(self, event: dict[str, Any]) -> None:
        event = dict(event)
        kind = event.pop("kind", "member")
        event.pop("t", None)
        self.emit(kind, **event)

    async def _join(self, seeds: list[str]) -> None:
        assert self.membership is not None
        if any(dns.is_dns(s) for s in seeds):
            specs = list(seeds)
            seeds = await self._resolve_seeds(specs)
            self._spawn(self._rediscover(specs), "rediscover")
        seeds = [a for a in seeds if a != self.node.addr]
        if not seeds:
            return
        try:
            await self.membership.join(seeds, self.config.join_timeout)
        except JoinError as exc:
            refused = [
                (a, self.node.auth_failures[a]) for a in seeds if a in self.node.auth_failures
            ]
            if refused:  # nobody answered because nobody let us in: say so, whatever we are
                addr, why = refused[0]
                raise AgentError(f"{addr}: {why}") from None
            # A resumed peer may outlive its swarm (the others finished while it was down):
            # it finishes its own work alone. A fresh peer that nobody answers is an error.
            if not self.resumed:
                raise AgentError(str(exc)) from None
            log.warning("%s; resuming alone", exc)

    async def _resolve_seeds(self, specs: list[str]) -> list[str]:
        """The addresses behind ``dns:`` seeds, retried until ``join_timeout``: a Service's
        records appear only once its pods have addresses. Only our own record (the first
        pod of a swarm) is an answer too: we start alone and ``_rediscover`` merges us."""
        deadline = time.monotonic() + self.config.join_timeout
        while True:
            try:
                found = await dns.expand(specs)
            except dns.DnsError as exc:
                if time.monotonic() + RESOLVE_RETRY > deadline:
                    if self.resumed:
                        log.warning("%s; resuming alone", exc)
                        return []
                    raise AgentError(str(exc)) from None
                log.info("%s; retrying", exc)
                await asyncio.sleep(RESOLVE_RETRY)
                continue
            self.emit("resolved", seeds=specs, addrs=found)
            return found

    async def _rediscover(self, specs: list[str]) -> None:
        """While no member is alive (we started alone, or every neighbour we knew is gone),
        resolve the ``dns:`` seeds again and join through what they name now."""
        assert self.membership is not None
        while True:
            await asyncio.sleep(REDISCOVER_SECONDS)
            if self._left or self.alive_count() > 0:
                continue
            try:
                found = await dns.expand(specs)
            except dns.DnsError as exc:
                log.debug("rediscover: %s", exc)
                continue
            addrs = [a for a in found if a != self.node.addr]
            if addrs:
                log.info("no live member; joining again through %s", ", ".join(addrs))
                self.membership.rejoin(addrs)

    async def _assemble(self) -> None:
        """Wait for ``wait_peers`` members (self included), at most ``join_timeout``."""
        want = self.config.wait_peers
        if want <= 1 or self.resumed:
            return
        t0 = time.monotonic()
        deadline = t0 + self.config.join_timeout
        while self.alive_count() + 1 < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        have = self.alive_count() + 1
        seconds = round(time.monotonic() - t0, 3)
        self.emit("assembled", members=have, wanted=want, seconds=seconds)
        if have < want:
            log.warning("%d of %d peers after %.0f s; training with those", have, want, seconds)

    async def _catch_up(self) -> None:
        """Take a live neighbour's current weights before contributing our own.

        A restarted peer's checkpoint is stale and a newcomer's init is random; either would
        drag the swarm back if mixed in. A neighbour less than a gossip period ahead holds
        about our own init (same seed), so a fresh swarm starts without moving weights.
        """
        if not self.config.join and not self.resumed:
            return
        # A newcomer asks for weights only from a neighbour at least a gossip period ahead:
        # one that is not holds about our own init (same seed), as close as any partner,
        # and the weights would travel for nothing.
        ahead = 0 if self.resumed else self.config.schedule.period_steps
        self.exchanger.ready = False
        t0 = time.monotonic()
        try:
            for addr in self.neighbours()[:3]:
                try:
                    remote, step = await self.exchanger.pull(addr, min_step=ahead)
                except IncompatiblePeer as exc:
                    raise AgentError(str(exc)) from None
                except (TransportError, OSError, TimeoutError, ValueError) as exc:
                    log.info("catch-up from %s failed: %s", addr, exc)
                    continue
                if remote is None or step < ahead:
                    return
                await asyncio.to_thread(self._load, remote)
                await asyncio.to_thread(self.exchanger.reanchor)
                self.emit(
                    "caught_up",
                    source=addr,
                    remote_step=step,
                    seconds=round(time.monotonic() - t0, 3),
                )
                return
        finally:
            self.exchanger.ready = True

    async def resync(self) -> str | None:
        """Take a live neighbour's current weights in place of ours, as a restarted peer's
        catch-up does, and forget what our screen learnt: for a peer whose own weights are
        known to be bad (a poisoned peer under the chaos tool, once cured). Offers are
        declined meanwhile. Returns the neighbour's address, None if none answered."""
        self.exchanger.screen.reset()
        self.exchanger.ready = False
        t0 = time.monotonic()
        try:
            for addr in self.neighbours()[:3]:
                try:
                    remote, step = await self.exchanger.pull(addr)
                except (IncompatiblePeer, TransportError, OSError, TimeoutError, ValueError) as exc:
                    log.info("resync from %s failed: %s", addr, exc)
                    continue
                if remote is None:  # not asked with min_step: cannot happen
                    continue
                await asyncio.to_thread(self._load, remote)
                await asyncio.to_thread(self.exchanger.reanchor)
                seconds = round(time.monotonic() - t0, 3)
                self.emit("caught_up", source=addr, remote_step=step, seconds=seconds, resync=True)
                return addr
        finally:
            self.exchanger.ready = True
        return None

    def _load_array(self, vector: np.ndarray) -> None:
        with self.store.lock:
            self.store.array[:] = vector

    # -- gossip while training -----------------------------------------------------------------
    def stepped(self) -> None:
        """One training step done (call from any thread): offer an exchange once a period."""
        if self._clock is None:  # not started
            return
        # begun: an int the loop thread writes; reading it here needs no lock
        if self._clock.step(self.exchanger.begun) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._kick.set)

    def kick(self) -> None:
        """Offer an exchange now (call from any thread): an outer step just ended."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._kick.set)

    def neighbours(self) -> list[str]:
        """Live neighbours to try, in order (see ``partner_order``)."""
        if self.membership is None:
            return []
        addrs = [
            addr
            for _, addr in self.membership.alive_addrs()
            if addr not in self.exchanger.incompatible and not self.exchanger.quarantined(addr)
        ]
        order = partner_order(addrs, self._partnered, self.rng)
        if not self._unreachable:
            return order
        # Neighbours whose last exchange failed (cut off, stalled) go last until their
        # back-off ends: otherwise each round would wait out their timeouts first, while a
        # reachable partner is tried third, or never (a partition stalled exchanges so).
        now = time.monotonic()
        late = {a for a, (until, _) in self._unreachable.items() if until > now}
        return [a for a in order if a not in late] + [a for a in order if a in late]

    async def _gossip_loop(self) -> None:
        budget = CpuBudget(self.config.schedule.time_budget)
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.status == "training":
                # Over the CPU budget (exchanges started and answered alike): wait until
                # back within it, at most MAX_BUDGET_WAIT so lingering is never held up.
                wait = budget.wait(self.exchanger.cpu_seconds, time.monotonic())
                if wait > 0:
                    await asyncio.sleep(min(MAX_BUDGET_WAIT, wait))
            await self._period_round(budget)

    async def _period_round(self, budget: CpuBudget) -> None:
        """This period's exchange: a round, tried again while training if it found only
        busy peers (``ScheduleConfig.busy_retries``), until an exchange has begun (ours or
        a neighbour's), the next period starts, or gossip is over its CPU budget."""
        begun = self.exchanger.begun
        for _ in range(max(0, self.config.schedule.busy_retries)):
            if not await self.gossip_round():
                return
            if (
                self.status != "training"
                or self._kick.is_set()
                or self.exchanger.begun != begun
                or budget.wait(self.exchanger.cpu_seconds, time.monotonic()) > 0
            ):
                return
            typical = min(BUSY_RETRY_MAX, max(BUSY_RETRY_MIN, self.exchanger.typical_seconds))
            await asyncio.sleep(self.rng.uniform(0.25, 0.75) * typical)
        else:
            await self.gossip_round()

    async def gossip_round(self) -> bool:
        """Average with one live neighbour, in ``partner_order``; a busy one is skipped.
        True when nothing was exchanged and only for busy-ness (ours or the neighbours')."""
        tried, only_busy = False, True
        for addr in self.neighbours()[: self.config.schedule.max_attempts]:
            if self.exchanger.busy:
                return True  # answering a neighbour (or catching up): every try would fail
            out = await self.exchanger.exchange(addr)
            tried = True
            self.on_exchange(out)
            if out.ok or out.busy or out.declined:
                self._unreachable.pop(addr, None)  # it answered
            else:
                _, last = self._unreachable.get(addr, (0.0, 0.0))
                backoff = min(UNREACHABLE_MAX_BACKOFF, max(1.0, 2 * last))
                self._unreachable[addr] = (time.monotonic() + backoff, backoff)
                while len(self._unreachable) > 1024:  # addresses of members long gone
                    self._unreachable.pop(next(iter(self._unreachable)))
            if out.ok:
                self._partnered.add(addr)
                self.exchange_seconds += out.seconds
                if not self._first_exchange_seen:
                    self._first_exchange_seen = True
                    seconds = round(time.monotonic() - self.t0, 3)
                    self.emit("first_exchange", partner=addr, seconds=seconds)
                return False
            if not out.busy:
                only_busy = False
                log.debug("exchange with %s failed: %s", addr, out.reason)
            # Busy peers decline at once; a short random pause breaks lockstep retries.
            await asyncio.sleep(self.rng.uniform(0.0, 0.01))
        return tried and only_busy

    # -- after training --------------------------------------------------------------------------
    def finished_training(self) -> None:
        """Our last step is done: say so in our offers and in membership."""
        self.exchanger.training = False
        if self.membership is not None:
            self.membership.set_meta(FINISHED)

    def still_training(self) -> list[str]:
        """Live members (suspects included) that have not said they finished."""
        if self.membership is None:
            return []
        return [m.name for m in self.membership.swim.alive() if m.meta != FINISHED]

    async def linger(self, step_seconds: float, stop: threading.Event | None = None) -> None:
        """Keep averaging (no more steps) while some live member still trains, so it has
        partners and every finished peer moves toward the consensus before it is saved.

        Ends once every live member has finished (after one last exchange), or after
        ``linger_seconds``, or when ``stop`` is set.
        """
        self.finished_training()
        limit = self.config.linger_seconds
        if limit <= 0 or (stop is not None and stop.is_set()):
            return
        self.status = "averaging"
        interval = linger_interval(self.config.schedule, step_seconds)
        start = time.monotonic()
        reason = "upper bound"
        while time.monotonic() - start < limit:
            if stop is not None and stop.is_set():
                reason = "stopped"
                break
            if not self.still_training():
                reason = "all finished"
                await self._last_exchange(start + limit)
                break
            self._kick.set()
            await asyncio.sleep(interval)
        self.lingered = round(time.monotonic() - start, 3)
        self.linger_reason = reason
        self.emit("lingered", seconds=self.lingered, reason=reason)

    async def _last_exchange(self, deadline: float) -> None:
        """Everyone has finished: one more exchange (ours or a neighbour's) so the weights
        we save include the others' last steps, then go. Two peers end equal this way.

        A few rounds at most, each over at once when the neighbours decline (a neighbour
        already saving its final model does): it never holds a peer that has nobody left."""
        if self.membership is None or not self.membership.alive_addrs():
            return
        before = self.exchanger.exchanges
        for _ in range(LAST_EXCHANGE_ROUNDS):
            if self.exchanger.exchanges != before or time.monotonic() >= deadline:
                return
            await self.gossip_round()
            await asyncio.sleep(self.rng.uniform(0.0, 0.01))

    # -- reporting -------------------------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        if self.membership is None:
            return []
        return [
            {
                "name": m.name,
                "addr": m.addr,
                "state": m.state.name.lower(),
                "incarnation": m.incarnation,
                "meta": m.meta,
            }
            for m in self.membership.swim.members()
        ]

    def alive_count(self) -> int:
        return len(self.membership.alive_addrs()) if self.membership is not None else 0

    def known_peers(self) -> list[str]:
        """Live neighbours' addresses (to rejoin through after a restart)."""
        if self.membership is None:
            return list(self.config.join)
        return [addr for _, addr in self.membership.alive_addrs()] or list(self.config.join)

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.emit(kind, **fields)
