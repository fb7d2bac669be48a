"""One peer: a node on the network, membership, the exchanger, and the training thread.

``gossip-train peer`` runs exactly this, and ``gossip-train local`` starts N processes that
each run it, so there is a single code path for one machine and for many.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip.exchange import Exchanger, GossipConfig, IncompatiblePeer
from p2p.framing import Frame, MsgType
from p2p.membership import JoinError, Membership
from p2p.node import Node, NodeConfig
from p2p.swim import Swim, SwimConfig
from p2p.transport import Connection, Transport, TransportError, parse_addr

from .checkpoint import save_atomic
from .config import PeerConfig
from .loop import StepInfo, TrainerBase
from .task import TaskError

log = logging.getLogger(__name__)

PROFILES = {
    "local": SwimConfig.local,
    "lan": SwimConfig.lan,
    "wan": SwimConfig.wan,
    "test": SwimConfig.test,
}
# Progress lines are reported at most this often.
PROGRESS_INTERVAL = 0.5
# Longest pause the gossip CPU budget may impose before one exchange.
MAX_BUDGET_WAIT = 1.0


class CpuBudget:
    """Gossip may use ``share`` CPU seconds per wall second: a bucket of credit.

    Credit accrues at ``share`` per second, at most ``burst`` seconds' worth, and every CPU
    second gossip spends draws it down. ``wait`` says how long until the credit is positive
    again (0 if it is now).
    """

    def __init__(self, share: float, burst: float = 5.0) -> None:
        self.share = share
        self.cap = share * burst
        self.credit = self.cap
        self._spent = 0.0
        self._t: float | None = None

    def wait(self, spent: float, now: float) -> float:
        if self.share <= 0:
            return 0.0
        if self._t is not None:
            self.credit = min(self.cap, self.credit + self.share * (now - self._t))
        self.credit -= spent - self._spent
        self._spent, self._t = spent, now
        return 0.0 if self.credit >= 0 else -self.credit / self.share


class PeriodClock:
    """When a training peer should offer its next exchange: after ``period`` steps without one.

    An exchange a neighbour started counts as this period's, so exchanges come evenly spaced,
    about one per period per peer, instead of two at random offsets (the second of which
    mixes little). After each exchange the count restarts at a random offset within a
    quarter period, so two partners do not both reach the period on the same step and
    offer to each other at once (each would decline the other: busy).
    """

    def __init__(self, period: int, rng: random.Random) -> None:
        self.period = max(1, period)
        self.spread = max(1, self.period // 4)
        self.rng = rng  # used from the training thread only
        self.since = 0
        self._seen = 0

    def step(self, exchanges: int) -> bool:
        """One training step done, ``exchanges`` completed so far: True to offer one now."""
        if exchanges != self._seen:
            self._seen = exchanges
            self.since = self.rng.randint(-self.spread, self.spread)
        self.since += 1
        if self.since >= self.period:
            self.since = 0
            return True
        return False


def partner_order(addrs: list[str], partnered: set[str], rng: random.Random) -> list[str]:
    """``addrs`` in the order to try them: those not in ``partnered`` first, shuffled.

    Partners are drawn without replacement: every live neighbour is picked once before any
    is picked twice, then the cycle starts over (``partnered`` is cleared). Averaging twice
    in a row with the same partner mixes almost nothing new; a cycle spreads each average.
    """
    fresh = [a for a in addrs if a not in partnered]
    if not fresh:
        partnered.clear()
        fresh = list(addrs)
    stale = [a for a in addrs if a in partnered]
    rng.shuffle(fresh)
    rng.shuffle(stale)
    return fresh + stale


def linger_pace(g: GossipConfig, step_seconds: float) -> tuple[float, float]:
    """How long a lingering peer waits without a training peer's offer before it leaves, and
    how often it offers meanwhile, for a model whose steps take ``step_seconds``.

    Training peers offer about once a period (``period_steps`` of their steps). For a model
    whose period lasts seconds, a fixed quiet window would let finished peers leave while a
    slower one still trains, and offers every ``linger_interval`` would average a training
    peer many times a period with frozen weights, holding it back. So the window is at least
    three periods and the offers at most two a period (the seed MLP: 2 s and 50 ms, as set).
    """
    period = max(0.0, g.period_steps * step_seconds)
    return max(g.linger_quiet, 3.0 * period), max(g.linger_interval, period / 2.0)


class PeerError(Exception):
    """A fatal, user-facing problem (bad address, nobody to join, ...): one line, exit 2."""


Reporter = Callable[[dict[str, Any]], None]


def jsonl_reporter(stream: Any = sys.stdout) -> Reporter:
    lock = threading.Lock()

    def report(event: dict[str, Any]) -> None:
        with lock:
            stream.write(json.dumps(event) + "\n")
            stream.flush()

    return report


class Peer:
    def __init__(
        self,
        cfg: PeerConfig,
        trainer: TrainerBase,
        transport: Transport,
        report: Reporter | None = None,
        incarnation: int = 0,
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.transport = transport
        self.report = report or (lambda event: None)
        self.incarnation = incarnation
        self.node = Node(transport, cfg.name or "?", NodeConfig(cluster=cfg.cluster))
        self.exchanger = Exchanger(self.node, trainer.weights, cfg.gossip)
        self.membership: Membership | None = None
        self.rng = random.Random(cfg.train.seed * 1000 + cfg.index)
        self._partnered: set[str] = set()  # this cycle's partners, see neighbours()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.status = "starting"
        self.exchange_seconds = 0.0
        self._kick: asyncio.Event | None = None
        self._last_progress = 0.0
        self.stopped_by_signal = False
        self._first_exchange_seen = False
        self._ckpt_peers: list[str] = []  # known peers saved in the checkpoint resumed from
        self._ckpt_error: str | None = None  # last background checkpoint error reported

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """The whole life of a peer. SIGTERM/SIGINT stop training early but still finish
        cleanly: final weights saved, a last checkpoint written, a graceful leave."""
        self._make_run_dir()
        self._open_checkpoints()
        await self._start_node()
        assert self.membership is not None
        self._install_signals()
        try:
            async with asyncio.TaskGroup() as tg:
                member_task = tg.create_task(self.membership.run())
                await asyncio.sleep(0)  # let the driver start before join() needs it
                await self._join()
                await self._catch_up()
                gossip_task = tg.create_task(self._gossip_loop())
                try:
                    await self._train()
                except TaskError as exc:
                    # A diverged loss, a task that returns the wrong thing: stop sharing
                    # weights at once, say why, and leave rather than be declared dead.
                    self.exchanger.ready = False
                    self.emit("error", error=str(exc), step=self.trainer.step)
                    await self.membership.leave(timeout=2.0)
                    raise
                await self._linger()
                gossip_task.cancel()
                result = await self._finish()
                await self.membership.leave(timeout=2.0)
                member_task.cancel()
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        finally:
            self.stop.set()
            await asyncio.to_thread(self.trainer.close)
            self.exchanger.close()
            await self.node.close()
        return result

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no signal support

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.warning("%s: stopping after the current step", signal.Signals(sig).name)
            self.stopped_by_signal = True
            self.stop.set()
            self.cfg = dataclasses.replace(self.cfg, linger_seconds=0.0)

    def _make_run_dir(self) -> None:
        run_dir = Path(self.cfg.run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PeerError(f"run dir {run_dir}: cannot create ({exc.strerror or exc})") from None
        if not os.access(run_dir, os.W_OK):
            raise PeerError(f"run dir {run_dir}: not writable")

    def _open_checkpoints(self) -> None:
        cfg = self.cfg.checkpoint
        if cfg.directory is None:
            return
        ckpt = self.trainer.enable_checkpoints(cfg)
        if ckpt is not None:
            # A restarted peer must outrank what others remember of its previous life.
            self.incarnation = max(self.incarnation, int(ckpt["incarnation"]) + 1)
            self._ckpt_peers = [str(p) for p in ckpt["peers"]]
            self.emit(
                "resumed",
                step=self.trainer.step,
                checkpoint=self.trainer.resumed_from,
                incarnation=self.incarnation,
            )
        self.trainer.ckpt_meta = {"incarnation": self.incarnation, "peers": list(self.cfg.join)}
        # Written now, not in the background: a full or unwritable folder is an error before
        # we join, and the raised incarnation is on disk should we die before the next one.
        self.trainer.checkpoint_now(wait=True)

    def _refresh_ckpt_meta(self) -> None:
        """What the next checkpoint records: live peers to rejoin through, our incarnation
        (refuting a suspicion raises it)."""
        if self.membership is None or self.trainer.checkpointer is None:
            return
        peers = [addr for _, addr in self.membership.alive_addrs()] or list(self.cfg.join)
        self.trainer.ckpt_meta = {"incarnation": self.membership.swim.incarnation, "peers": peers}

    async def _catch_up(self) -> None:
        """Take a live neighbour's current weights before contributing our own.

        A restarted peer's checkpoint is stale and a newcomer's init is random; either would
        drag the swarm back if mixed in. A neighbour still at step 0 has our own init (same
        seed), so a fresh swarm starts without a pull.
        """
        if not self.cfg.join and self.trainer.resumed_from is None:
            return
        self.exchanger.ready = False
        t0 = time.monotonic()
        try:
            for addr in self.neighbours()[:3]:
                try:
                    remote, step = await self.exchanger.pull(addr)
                except IncompatiblePeer as exc:
                    raise PeerError(str(exc)) from None
                except (TransportError, OSError, TimeoutError, ValueError) as exc:
                    log.info("catch-up from %s failed: %s", addr, exc)
                    continue
                if step == 0 and self.trainer.resumed_from is None:
                    return
                await asyncio.to_thread(self.trainer.weights.load, remote)
                self.emit(
                    "caught_up",
                    source=addr,
                    remote_step=step,
                    seconds=round(time.monotonic() - t0, 3),
                )
                return
        finally:
            self.exchanger.ready = True

    async def _start_node(self) -> None:
        host, port = parse_addr(self.cfg.listen)
        try:
            await self.node.start(host, port, self.cfg.advertise)
        except TransportError as exc:
            raise PeerError(str(exc)) from None
        if not self.cfg.name:
            self.node.name = self.node.addr
        profile = PROFILES[self.cfg.profile]()
        swim = Swim(
            self.node.name,
            self.node.addr,
            profile,
            self.rng,
            time.monotonic(),
            incarnation=self.incarnation,
        )
        self.membership = Membership(swim, self._send_swim)
        self.membership.on_event = self._on_member_event
        self.node.handlers[MsgType.SWIM] = self._on_swim
        self.node.handlers[MsgType.STATUS_REQ] = self._on_status
        if self.cfg.allow_control:
            self.node.handlers[MsgType.CONTROL] = self._on_control
        self.exchanger.step_fn = lambda: self.trainer.step
        self._kick = asyncio.Event()
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

    async def _join(self) -> None:
        assert self.membership is not None
        # Restarted without --join (the first peer of a swarm, say): rejoin through the
        # peers its checkpoint remembers.
        seeds = list(self.cfg.join) or [a for a in self._ckpt_peers if a != self.node.addr]
        if not seeds:
            return
        try:
            await self.membership.join(seeds, self.cfg.join_timeout)
        except JoinError as exc:
            # A resumed peer may outlive its swarm (the others finished while it was down):
            # it finishes its own work alone. A fresh peer that nobody answers is an error.
            if self.trainer.resumed_from is None:
                raise PeerError(str(exc)) from None
            log.warning("%s; resuming alone", exc)

    # -- training and gossip -------------------------------------------------------------------
    async def _train(self) -> None:
        assert self._kick is not None
        loop = asyncio.get_running_loop()
        kick = self._kick
        period = max(1, self.cfg.gossip.period_steps)
        clock = PeriodClock(period, random.Random(self.rng.random()))
        exchanger = self.exchanger

        def on_step(info: StepInfo) -> None:
            if info.metrics is not None:
                metrics = info.metrics
                loop.call_soon_threadsafe(lambda: self._eval_event(info.step, metrics))
            # exchanges: an int the loop thread writes; reading it here needs no lock
            if clock.step(exchanger.exchanges):
                loop.call_soon_threadsafe(kick.set)
            now = time.monotonic()
            if (
                now - self._last_progress >= PROGRESS_INTERVAL
                or info.step == self.trainer.total_steps
            ):
                self._last_progress = now
                loop.call_soon_threadsafe(self._progress)

        self.status = "training"
        self.emit("started", steps=self.trainer.total_steps, samples=self.trainer.shard_size)
        try:
            await self.trainer.drive(self.stop, on_step)
        finally:
            self.stop.set()

    def _eval_event(self, step: int, metrics: dict[str, float]) -> None:
        extra = {"accuracy": round(metrics["accuracy"], 4)} if "accuracy" in metrics else {}
        self.emit("eval", step=step, metrics=metrics, **extra)

    def _report_checkpoint_error(self) -> None:
        """One event per streak of failed background writes (disk filled up mid-run, say):
        training goes on, but the user must learn that a crash would now lose more."""
        writer = self.trainer.checkpointer
        error = writer.last_error if writer is not None else None
        if error is not None and str(error) != self._ckpt_error:
            self.emit("checkpoint_failed", error=str(error), step=self.trainer.step)
        self._ckpt_error = None if error is None else str(error)

    def _progress(self) -> None:
        self._refresh_ckpt_meta()
        self._report_checkpoint_error()
        t = self.trainer
        self.emit(
            "progress",
            step=t.step,
            total=t.total_steps,
            loss=round(t.loss, 4) if math.isfinite(t.loss) else None,
            exchanges=self.exchanger.exchanges,
            bytes_sent=self.transport.stats.sent,
            bytes_received=self.transport.stats.received,
            alive=len(self.membership.alive_addrs()) if self.membership else 0,
        )

    def neighbours(self) -> list[str]:
        """Live neighbours to try, in order (see ``partner_order``)."""
        assert self.membership is not None
        addrs = [
            addr
            for _, addr in self.membership.alive_addrs()
            if addr not in self.exchanger.incompatible
        ]
        return partner_order(addrs, self._partnered, self.rng)

    async def _gossip_loop(self) -> None:
        assert self._kick is not None
        budget = CpuBudget(self.cfg.gossip.time_budget)
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.status == "training":
                # Over the CPU budget (exchanges started and answered alike): wait until
                # back within it, at most MAX_BUDGET_WAIT so lingering is never held up.
                wait = budget.wait(self.exchanger.cpu_seconds, time.monotonic())
                if wait > 0:
                    await asyncio.sleep(min(MAX_BUDGET_WAIT, wait))
            await self.gossip_round()

    async def gossip_round(self) -> None:
        """Average with one live neighbour, in ``partner_order``; a busy one is skipped."""
        for addr in self.neighbours()[: self.cfg.gossip.max_attempts]:
            out = await self.exchanger.exchange(addr)
            if out.ok:
                self._partnered.add(addr)
                self.exchange_seconds += out.seconds
                if not self._first_exchange_seen:
                    self._note_first_exchange(addr)
                return
            if not out.busy:
                log.debug("exchange with %s failed: %s", addr, out.reason)
            # Busy peers decline at once; a short random pause breaks lockstep retries.
            await asyncio.sleep(self.rng.uniform(0.0, 0.01))

    def _note_first_exchange(self, addr: str) -> None:
        self._first_exchange_seen = True
        self.emit("first_exchange", partner=addr, seconds=round(time.monotonic() - self.t0, 3))

    # -- the end -----------------------------------------------------------------------------
    async def _finish(self) -> dict[str, Any]:
        t = self.trainer
        # Decline exchanges from now on: the accuracy reported, final.pt and the last
        # checkpoint must all be the same weights.
        self.exchanger.ready = False
        metrics = await asyncio.to_thread(t.evaluate, True)
        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final.pt"
        state = {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}
        await asyncio.to_thread(save_atomic, state, final)
        if t.checkpointer is not None:
            await asyncio.to_thread(t.checkpoint_now)  # the last state survives a restart
        self.status = "stopped" if self.stopped_by_signal else "finished"
        result = {
            "name": self.node.name,
            "addr": self.node.addr,
            "status": self.status,
            "metrics": metrics,
            "test_accuracy": metrics.get("accuracy"),
            "steps": t.step,
            "samples": t.samples,
            "exchanges": self.exchanger.exchanges,
            "rejected_updates": self.exchanger.rejected,
            "bytes_sent": self.transport.stats.sent,
            "bytes_received": self.transport.stats.received,
            "wall_seconds": round(time.monotonic() - self.t0, 3),
            "exchange_seconds": round(self.exchange_seconds, 3),
            "gossip_cpu_seconds": round(self.exchanger.cpu_seconds, 3),
            "step_seconds": t.step_seconds,
            "final_model": str(final),
            "schema": t.weights.schema,
        }
        self.emit("finished", **result)
        return result

    async def _linger(self) -> None:
        """After training: keep averaging (no more steps) so peers still training have
        partners and every finished peer moves toward the consensus before it is saved."""
        self.exchanger.training = False
        if self.cfg.linger_seconds <= 0 or self.stopped_by_signal:
            return
        assert self._kick is not None
        self.status = "averaging"
        g = self.cfg.gossip
        quiet_after, interval = linger_pace(g, self.trainer.step_seconds)
        start = time.monotonic()
        while not self.stopped_by_signal:
            now = time.monotonic()
            quiet = now - self.exchanger.last_training_offer >= quiet_after
            if (now - start >= self.cfg.linger_seconds and quiet) or now - start >= g.linger_max:
                break
            self._kick.set()
            await asyncio.sleep(interval)
        self.emit("lingered", seconds=round(time.monotonic() - start, 3))

    # -- status ------------------------------------------------------------------------------
    def status_dict(self) -> dict[str, Any]:
        members = []
        if self.membership is not None:
            for m in self.membership.swim.members():
                members.append(
                    {
                        "name": m.name,
                        "addr": m.addr,
                        "state": m.state.name.lower(),
                        "incarnation": m.incarnation,
                    }
                )
        t = self.trainer
        return {
            "name": self.node.name,
            "addr": self.node.addr,
            "status": self.status,
            "step": t.step,
            "total_steps": t.total_steps,
            "loss": t.loss,
            "exchanges": self.exchanger.exchanges,
            "members": members,
        }

    async def _on_control(self, conn: Connection, frame: Frame) -> None:
        """Fault injection: {"op": "slowdown", "factor": F} makes each step take F times as
        long (F=4: a straggler at a quarter of its speed); F=1 restores full speed."""
        op, factor = frame.header.get("op"), frame.header.get("factor")
        if op != "slowdown" or not isinstance(factor, (int, float)) or not 1 <= factor <= 1000:
            await conn.send(MsgType.ERROR, {"reason": f"bad control command {frame.header!r}"})
            return
        self.trainer.slowdown = float(factor) - 1.0
        self.emit("slowdown", factor=float(factor))
        await conn.send(MsgType.CONTROL_OK, {"op": op, "factor": factor})

    async def _on_status(self, conn: Connection, frame: Frame) -> None:
        await conn.send(MsgType.STATUS, self.status_dict())

    def emit(self, kind: str, **fields: Any) -> None:
        self.report(
            {
                "ts": time.time(),
                "peer": self.node.name,
                "kind": kind,
                **fields,
            }
        )


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first real exception in a (nested) group: what the user should see."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
