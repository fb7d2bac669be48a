"""One training peer: a trainer (``trainer.loop``) and the gossip agent (``gossip.agent``).

The agent does everything on the network; this adds what needs torch: checkpoints (and the
incarnation and peers they remember), the training drive, evaluation, the final model, and
the peer's record. Events go to ``RUN_DIR/events.jsonl`` (durable) and, best effort, to a
watcher's channel (``--events-fd``): a watcher that goes away never stops the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gossip.agent import Agent, AgentError
from gossip.events import Channel, EventFile, Events
from gossip.outer import OuterStore
from p2p.framing import Frame, MsgType, show
from p2p.transport import Connection, Transport

from .checkpoint import CheckpointError, save_atomic
from .config import PeerConfig
from .loop import StepInfo, TrainerBase
from .poison import Poison
from .poison import check as check_poison
from .runtime import UserError

log = logging.getLogger(__name__)

# Progress lines are reported at most this often.
PROGRESS_INTERVAL = 0.5
EVENTS_FILE = "events.jsonl"


class PeerError(AgentError):
    """A fatal, user-facing problem (bad address, nobody to join, ...): one line, exit 2."""


def open_events(run_dir: str | Path, channel_fd: int | None = None) -> Events:
    """The peer's events: appended to RUN_DIR/events.jsonl, and to ``channel_fd`` if given."""
    path = Path(run_dir) / EVENTS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = EventFile(path)
    except OSError as exc:
        where = f"run dir {path.parent}: cannot write events"
        raise PeerError(f"{where} ({exc.strerror or exc})") from None
    return Events(file, Channel(channel_fd) if channel_fd is not None else None)


class Peer:
    def __init__(
        self,
        cfg: PeerConfig,
        trainer: TrainerBase,
        transport: Transport,
        events: Events | None = None,
        incarnation: int = 0,
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.transport = transport
        self._own_events = events is None
        self.events = events or Events()
        self.incarnation = incarnation
        self.stop = threading.Event()  # ends training (its last step, or a signal)
        self._signalled = threading.Event()  # SIGTERM/SIGINT: ends lingering too
        self.status = "starting"
        self.stopped_by_signal = False
        self._last_progress = 0.0
        self._ckpt_peers: list[str] = []  # known peers saved in the checkpoint resumed from
        self._ckpt_error: str | None = None  # last background checkpoint error reported
        self.agent: Agent | None = None
        self.outer: OuterStore | None = None  # infrequent averaging (--outer-steps)
        self.metrics: Any = None  # trainer.metrics.PeerMetrics (--metrics-port)
        self._metrics_server: Any = None
        self._board: Any = None  # trainer.board.Board (--tensorboard)
        self.t0 = time.monotonic()

    @property
    def node(self) -> Any:
        assert self.agent is not None
        return self.agent.node

    @property
    def exchanger(self) -> Any:
        assert self.agent is not None
        return self.agent.exchanger

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """The whole life of a peer. SIGTERM/SIGINT stop training early but still finish
        cleanly: final weights saved, a last checkpoint written, a graceful leave. Whatever
        ends it otherwise is its last event (``error``), with how far it got."""
        try:
            return await self._run()
        except BaseException as exc:
            self._report_error(exc)
            raise
        finally:
            self.stop.set()
            await asyncio.to_thread(self.trainer.close)
            await self._stop_monitoring()
            if self._own_events:
                self.events.close()

    async def _run(self) -> dict[str, Any]:
        self._make_run_dir()
        if self._own_events and self.events.file is None:
            self.events = open_events(self.cfg.run_dir)
        if self.cfg.name:
            self.events.name = self.cfg.name  # the agent names it later when it has no name
        await self._start_monitoring()
        self._open_checkpoints()
        t = self.trainer
        store: Any = t.weights
        if self.cfg.outer.steps > 0:
            # Gossip averages the outer weights; the live ones follow every mix (gossip.outer).
            store = self.outer = t.outer = OuterStore(t.weights, self.cfg.outer)
            self._resume_outer()
        self._first_checkpoint()
        self.agent = Agent(
            self.cfg.agent_config(),
            store,
            self.transport,
            self.events,
            incarnation=self.incarnation,
            resumed=t.resumed_from is not None,
            step=lambda: t.step,
            load=store.load,
        )
        self.agent.handlers[MsgType.STATUS_REQ] = self._on_status
        if self.metrics is not None:
            self.agent.on_exchange = self.metrics.on_exchange
        if self.cfg.allow_control:
            self.agent.handlers[MsgType.CONTROL] = self._on_control
        # Restarted without --join (the first peer of a swarm, say): rejoin through the
        # peers its checkpoint remembers.
        seeds = list(self.cfg.join) or self._ckpt_peers
        try:
            await self.agent.start(seeds)
        except AgentError as exc:
            await self.agent.abort()
            raise PeerError(str(exc)) from None
        except BaseException:
            await self.agent.abort()
            raise
        async with self.agent:
            self._install_signals()
            await self._train_watching_agent()
            outer = self.outer
            if outer is not None and t.step % outer.config.steps:
                # The inner steps since the last outer step go into the outer weights too,
                # so lingering exchanges bring every peer's final weights together.
                await asyncio.to_thread(outer.step)
                self.agent.kick()
            await self.agent.linger(t.step_seconds, self._signalled)
            return await self._finish()

    async def _train_watching_agent(self) -> None:
        """Train; if an agent task fails meanwhile, stop training and raise its error."""
        assert self.agent is not None
        train = asyncio.ensure_future(self._train())
        failed = asyncio.ensure_future(self.agent.failure())
        try:
            await asyncio.wait({train, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            if not train.done():
                self.stop.set()
                with contextlib.suppress(BaseException):
                    await train
        if failed.done() and not failed.cancelled():
            raise failed.result()
        train.result()

    def _report_error(self, exc: BaseException) -> None:
        t = self.trainer
        if isinstance(exc, asyncio.CancelledError):
            error = "cancelled"
        elif isinstance(exc, KeyboardInterrupt):
            error = "interrupted"
        else:
            text = str(exc).strip().splitlines()
            error = text[0] if text else type(exc).__name__
        with contextlib.suppress(Exception):
            self.events.emit(
                "error",
                error=error,
                type=type(exc).__name__,
                step=t.step,
                samples=t.samples,
                exchanges=self.agent.exchanger.exchanges if self.agent else 0,
                checkpoint=self._last_checkpoint(),
            )

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no signal support

    def _on_signal(self, sig: int) -> None:
        if not self._signalled.is_set():
            log.warning("%s: stopping after the current step", signal.Signals(sig).name)
            self.stopped_by_signal = True
            self._signalled.set()
            self.stop.set()

    async def _start_monitoring(self) -> None:
        """--metrics-port and --tensorboard: before joining, so a port in use is an error
        before this peer is anyone's neighbour."""
        if self.cfg.metrics_port:
            from p2p.transport import parse_addr

            from .metrics import MetricsServer, PeerMetrics

            self.metrics = PeerMetrics(self)
            host = parse_addr(self.cfg.listen)[0]
            server = MetricsServer(self.metrics.render, host, self.cfg.metrics_port)
            try:
                await server.start()
            except UserError as exc:
                raise PeerError(str(exc)) from None
            self._metrics_server = server
            self.events.taps.append(self.metrics.on_event)
        if self.cfg.tensorboard is not None:
            from .board import Board

            self._board = Board(self.cfg.tensorboard)
            self.events.taps.append(self._board)

    async def _stop_monitoring(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self._board is not None:
            self.events.taps.remove(self._board)
            await asyncio.to_thread(self._board.close)

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
            self.events.emit(
                "resumed",
                step=self.trainer.step,
                checkpoint=self.trainer.resumed_from,
                incarnation=self.incarnation,
            )
        self.trainer.ckpt_meta = {"incarnation": self.incarnation, "peers": list(self.cfg.join)}

    def _resume_outer(self) -> None:
        """The outer weights and momentum of the checkpoint resumed from, if it has them (a
        checkpoint without them, or none: the outer weights start as the live ones)."""
        t, outer = self.trainer, self.outer
        if outer is None or t.resumed_outer is None:
            return
        try:
            outer.load_state(t.resumed_outer)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {t.resumed_from}: {exc}") from None
        log.info("resumed the outer state: %d outer steps", outer.outer_steps)

    def _first_checkpoint(self) -> None:
        # Written now, not in the background: a full or unwritable folder is an error before
        # we join, and the raised incarnation (and the outer state) is on disk should we die
        # before the next one.
        if self.trainer.checkpointer is not None:
            self.trainer.checkpoint_now(wait=True)

    def _refresh_ckpt_meta(self) -> None:
        """What the next checkpoint records: live peers to rejoin through, our incarnation
        (refuting a suspicion raises it)."""
        a = self.agent
        if a is None or a.membership is None or self.trainer.checkpointer is None:
            return
        self.trainer.ckpt_meta = {
            "incarnation": a.membership.swim.incarnation,
            "peers": a.known_peers(),
        }

    def _last_checkpoint(self) -> str | None:
        writer = self.trainer.checkpointer
        path = writer.last_path if writer is not None else None
        return str(path) if path is not None else self.trainer.resumed_from

    # -- training ----------------------------------------------------------------------------
    async def _train(self) -> None:
        assert self.agent is not None
        loop = asyncio.get_running_loop()
        agent = self.agent

        def on_step(info: StepInfo) -> None:
            if info.metrics is not None:
                metrics = info.metrics
                loop.call_soon_threadsafe(lambda: self._eval_event(info.step, metrics))
            outer = self.outer
            if outer is None:
                agent.stepped()
            elif info.step % outer.config.steps == 0:
                outer.step()  # in the training thread: the next inner step waits for it
                agent.kick()
            now = time.monotonic()
            if (
                now - self._last_progress >= PROGRESS_INTERVAL
                or info.step == self.trainer.total_steps
            ):
                self._last_progress = now
                loop.call_soon_threadsafe(self._progress)

        self.status = "training"
        self.events.emit("started", steps=self.trainer.total_steps, samples=self.trainer.shard_size)
        try:
            await self.trainer.drive(self.stop, on_step)
        finally:
            self.stop.set()

    def _eval_event(self, step: int, metrics: dict[str, float]) -> None:
        extra = {"accuracy": round(metrics["accuracy"], 4)} if "accuracy" in metrics else {}
        self.events.emit("eval", step=step, metrics=metrics, **extra)

    def _report_checkpoint_error(self) -> None:
        """One event per streak of failed background writes (disk filled up mid-run, say):
        training goes on, but the user must learn that a crash would now lose more."""
        writer = self.trainer.checkpointer
        error = writer.last_error if writer is not None else None
        if error is not None and str(error) != self._ckpt_error:
            self.events.emit("checkpoint_failed", error=str(error), step=self.trainer.step)
        self._ckpt_error = None if error is None else str(error)

    def _progress(self) -> None:
        self._refresh_ckpt_meta()
        self._report_checkpoint_error()
        t = self.trainer
        assert self.agent is not None
        self.events.emit(
            "progress",
            step=t.step,
            total=t.total_steps,
            samples=t.samples,
            loss=round(t.loss, 4) if math.isfinite(t.loss) else None,
            exchanges=self.agent.exchanger.exchanges,
            bytes_sent=self.transport.stats.sent,
            bytes_received=self.transport.stats.received,
            bytes=self.transport.stats.by_kind(),
            compression_ratio=round(self.agent.exchanger.compression_ratio, 4),
            disagreement=_rounded(self.agent.exchanger.take_disagreement()),
            alive=self.agent.alive_count(),
            checkpoint=self._last_checkpoint(),
        )

    # -- the end -----------------------------------------------------------------------------
    async def _finish(self) -> dict[str, Any]:
        t = self.trainer
        a = self.agent
        assert a is not None
        # No exchange from now on, and none still in flight: the accuracy reported,
        # final.pt and the last checkpoint must all be the same weights.
        await a.exchanger.quiesce(a.exchanger.deadline())
        metrics = await asyncio.to_thread(t.evaluate, True)
        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final.pt"
        state = {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}
        await asyncio.to_thread(save_atomic, state, final)
        if t.checkpointer is not None:
            await asyncio.to_thread(t.checkpoint_now)  # the last state survives a restart
        self.status = "stopped" if self.stopped_by_signal else "finished"
        result = {
            "name": a.node.name,
            "addr": a.node.addr,
            "status": self.status,
            "metrics": metrics,
            "test_accuracy": metrics.get("accuracy"),
            "steps": t.step,
            "samples": t.samples,
            "exchanges": a.exchanger.exchanges,
            "rejected_updates": a.exchanger.rejected,
            "compress": self.cfg.gossip.compress,
            "outer_steps": self.outer.outer_steps if self.outer is not None else None,
            "screening": a.exchanger.screen.stats() if self.cfg.gossip.robust.enabled else None,
            "poisoned": t.poison.mode if t.poison is not None else None,
            "refused_callers": a.node.refused_callers,
            "bytes_sent": self.transport.stats.sent,
            "bytes_received": self.transport.stats.received,
            "bytes": self.transport.stats.by_kind(),
            "compression_ratio": round(a.exchanger.compression_ratio, 4),
            "payload_bytes": {
                "raw": a.exchanger.raw_payload_bytes,
                "wire": a.exchanger.wire_payload_bytes,
            },
            "pull_replies": {
                "count": a.exchanger.pull_replies,
                "bytes": a.exchanger.pull_reply_bytes,
            },
            "wall_seconds": round(time.monotonic() - self.t0, 3),
            "exchange_seconds": round(a.exchange_seconds, 3),
            "gossip_cpu_seconds": round(a.exchanger.cpu_seconds, 3),
            "linger_seconds": a.lingered,
            "step_seconds": t.step_seconds,
            "final_model": str(final),
            "checkpoint": self._last_checkpoint(),
            "schema": t.weights.schema,
        }
        self.events.emit("finished", **result)
        return result

    # -- status ------------------------------------------------------------------------------
    def status_dict(self) -> dict[str, Any]:
        t = self.trainer
        a = self.agent
        return {
            "name": a.node.name if a else self.cfg.name,
            "addr": a.node.addr if a else self.cfg.listen,
            "status": a.status if a and self.status == "training" else self.status,
            "step": t.step,
            "total_steps": t.total_steps,
            "loss": t.loss,
            "exchanges": a.exchanger.exchanges if a else 0,
            "members": a.members() if a else [],
        }

    async def _on_control(self, conn: Connection, frame: Frame) -> None:
        """Fault injection (peers started with --allow-control):

        - ``{"op": "slowdown", "factor": F}`` makes each step take F times as long (F=4: a
          straggler at a quarter of its speed); F=1 restores full speed.
        - ``{"op": "poison", "mode": M, "factor": F}`` makes this peer a hostile member
          (``trainer.poison``: M is zero, negate, scale or noise; F optional): its weights
          are rewritten after every step and it mixes nothing in. ``"mode": "none"`` cures
          it: it takes a live neighbour's weights (``Agent.resync``) and mixes again.
        """
        h = frame.header
        op = h.get("op")
        if op == "slowdown":
            factor = h.get("factor")
            if isinstance(factor, (int, float)) and 1 <= factor <= 1000:
                self.trainer.slowdown = float(factor) - 1.0
                self.events.emit("slowdown", factor=float(factor))
                await conn.send(MsgType.CONTROL_OK, {"op": op, "factor": factor})
                return
        elif op == "poison" and h.get("mode") == "none":
            await conn.send(MsgType.CONTROL_OK, {"op": op, "mode": "none"})
            await self._cure()  # after the answer: it waits for a neighbour's weights
            return
        elif op == "poison" and check_poison(str(h.get("mode")), h.get("factor")) is None:
            poison = Poison(str(h["mode"]), h.get("factor"))
            if self.agent is not None:
                self.agent.exchanger.apply_received = False
            self.trainer.poison = poison
            self.events.emit("poison", mode=poison.mode, factor=poison.factor)
            await conn.send(MsgType.CONTROL_OK, {"op": op, "mode": poison.mode})
            return
        await conn.send(MsgType.ERROR, {"reason": f"bad control command {show(h, 200)}"})

    async def _cure(self) -> None:
        """End a poison: the weights are garbage, so take a neighbour's, then mix again."""
        was = self.trainer.poison
        self.trainer.poison = None
        if was is None or self.agent is None:
            return
        # The optimizer's state (Adam's moments, momentum) was built on the poison's
        # trajectory: kept, it would carry the cured peer away from the weights it takes.
        state = getattr(self.trainer.optimizer, "state", None)
        if state is not None and hasattr(state, "clear"):
            with self.trainer.weights.lock:
                state.clear()
        source = await self.agent.resync()
        self.agent.exchanger.apply_received = True
        self.events.emit("poison", mode="none", was=was.mode, resynced_from=source)

    async def _on_status(self, conn: Connection, frame: Frame) -> None:
        await conn.send(MsgType.STATUS, self.status_dict())


def _rounded(x: float | None) -> float | None:
    """Four significant digits: a relative distance spans decades as peers converge."""
    return None if x is None else float(f"{x:.4g}")


def run_peer(cfg: PeerConfig, events_fd: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """``gossip-train peer``: build the trainer for ``cfg`` and run the peer to its end."""
    import torch

    from p2p.framing import Limits
    from p2p.transport import TcpTransport

    from .config import default_threads
    from .loop import Trainer
    from .runtime import run_async

    torch.set_num_threads(cfg.train.threads or default_threads(1))
    events = open_events(cfg.run_dir, events_fd)
    # Building the task reads (and may decompress) its data set: seconds on a large one.
    print(f"loading task {cfg.train.task} and its data", file=sys.stderr, flush=True)
    try:
        trainer = Trainer(cfg.train, cfg.index, cfg.num_peers)
    except BaseException as exc:
        # A bad task or data set: the events file says so, as it would for a failure later.
        events.name = cfg.name or cfg.listen
        text = str(exc).strip().splitlines()
        events.emit("error", error=text[0] if text else type(exc).__name__,
                    type=type(exc).__name__, step=0)  # fmt: skip
        events.close()
        raise
    if not quiet:
        print(f"task {trainer.task.name}: {trainer.total_steps} steps", flush=True)
    # No frame may be larger than a model's weights plus headroom: a garbage length from a
    # neighbour can then never make this peer allocate more than that.
    limits = Limits(max_payload=max(64 << 20, 2 * trainer.weights.nbytes))
    peer = Peer(cfg, trainer, TcpTransport(limits), events)
    try:
        return run_async(peer.run())
    finally:
        events.close()


def main(config: str, events_fd: int | None = None) -> int:
    """The peer entry point on a launcher's config file (the zygote's children call this;
    ``gossip-train peer --config`` is the same): 0 done, 2 a user's error (one line), 1 a bug."""
    from .config import load_config
    from .flags import validate
    from .runtime import EXIT_USAGE, first_line, is_user_error, setup_logging

    setup_logging(1)
    try:
        cfg = load_config(config)
        validate(cfg)
        run_peer(cfg, events_fd)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors become one line
        if not is_user_error(exc):
            raise
        print(f"gossip-train: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return 0
