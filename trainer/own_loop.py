"""``GossipOptimizer``: gossip for a training loop the user keeps.

    opt = GossipOptimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-4))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    result = opt.close()

The peer (membership, exchanges, checkpoints, linger, final model) is the same ``Peer`` that
``gossip-train peer`` runs, on a background thread with its own event loop. Its training
driver is ``OwnLoop``: instead of running our loop, it waits for the user's ``close()``,
and every ``opt.step()`` on the user's thread plays the part of one of our steps (the inner
update under the weights lock, the step counter, checkpoints, the gossip period).

Settings come from keyword arguments, then from the variables ``gossip-train run`` sets
(``GOSSIP_TRAIN_*``, ``RANK``, ``WORLD_SIZE``) or, under ``srun``, Slurm's (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``, ...: see ``trainer.launch.slurm``; the ports start
at ``GOSSIP_TRAIN_SLURM_PORT_BASE``, ``GOSSIP_TRAIN_SLURM=0`` turns this off), then from the
defaults of ``PeerConfig``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import ENV_PREFIX, LaunchConfig, PeerConfig, load_config
from .flags import slurm_defaults, slurm_wanted
from .launch import slurm
from .loop import BOUND_CHECK_EVERY, StepInfo, TrainerBase

# Seconds an exiting interpreter waits for a peer its script never closed (a failing peer:
# its last checkpoint write, a graceful leave, its tasks' end).
EXIT_TIMEOUT = 30.0

log = logging.getLogger(__name__)


class GossipError(RuntimeError):
    """The gossip side of a GossipOptimizer failed; the message says why."""


class OwnLoop(TrainerBase):
    """A training driver whose steps are the user's ``opt.step()`` calls."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        peer_index: int,
        num_peers: int,
        state: dict[str, Any],
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ) -> None:
        super().__init__(model, peer_index, num_peers)
        self._evaluate_fn = evaluate
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.user_state = state
        self.stop = threading.Event()  # set by close(): the user's loop is over
        self.started = threading.Event()  # set when the peer hands us on_step
        self._on_step: Callable[[StepInfo], None] | None = None
        self._t_last: float | None = None
        self.owner = threading.current_thread()  # the thread whose loop this is

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "task": "own-loop", "schema": self.weights.schema}

    def extra_state(self) -> dict[str, Any]:
        return {"user": dict(self.user_state)}

    def load_extra(self, ckpt: dict[str, Any], source: str) -> None:
        saved = ckpt.get("user") or {}
        self.user_state.clear()
        self.user_state.update(saved)

    def evaluate(self, locked: bool = False) -> dict[str, float]:
        """What ``report()`` said, and the user's ``evaluate(model)`` of the weights now."""
        if self._evaluate_fn is not None:
            lock = self.weights.lock if locked else contextlib.nullcontext()
            with lock, torch.no_grad():
                found = self._evaluate_fn(self.model)
            if not isinstance(found, dict):
                raise TypeError(f"evaluate() returned {type(found).__name__}, not a dict")
            # Its metrics first: the first key is the headline metric.
            fresh = {str(k): float(v) for k, v in found.items()}
            self.last_metrics = {
                **fresh,
                **{k: v for k, v in self.last_metrics.items() if k not in fresh},
            }
        return dict(self.last_metrics)

    async def drive(self, stop: threading.Event, on_step: Callable[[StepInfo], None]) -> None:
        """The peer's part: wait, on its own event loop, until the user's loop ends.

        No worker thread waits here: the gossip thread is a daemon, so a script that dies
        of an exception exits at once (to be restarted from its checkpoint) instead of
        hanging in the interpreter's join of busy worker threads. A loop thread that ends
        without ``close()`` fails the peer: no final model, no graceful leave.
        """
        self._on_step = on_step
        self.started.set()
        while not (self.stop.is_set() or stop.is_set()):
            if not self.owner.is_alive():
                raise GossipError("the training loop's thread ended without close()")
            await asyncio.sleep(0.05)

    def user_step(self, closure: Callable[[], Any] | None) -> Any:
        # A checkpoint is taken before this update, not after it: it then holds the state
        # after the previous step *and* what the loop did after that step (a scheduler step,
        # counters in ``state``), and a resume redoes this step from its batch.
        if self.checkpoint_due():
            self.checkpoint_now()
        with self.weights.lock:  # only the update, as in our own loop
            out = self.optimizer.step() if closure is None else self.optimizer.step(closure)
            self.after_update()
        t = time.perf_counter()
        if self._t_last is not None:  # a whole step of the user's loop, update to update
            dt = t - self._t_last
            self.step_seconds = (
                dt if not self.step_seconds else 0.98 * self.step_seconds + 0.02 * dt
            )
            if self.slowdown > 0:  # a chaos "slow" fault: a straggler, as in our loop
                time.sleep(dt * self.slowdown)
                t = time.perf_counter()
        self._t_last = t
        self.step += 1
        if self.step % BOUND_CHECK_EVERY == 0:
            self.weights.check_bound()
        if self._on_step is not None:
            self._on_step(StepInfo(self.step, self.loss, None, None, self.samples))
        return out


def _env(key: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + key)
    return value if value not in (None, "") else None


# GossipOptimizer's keyword arguments that set PeerConfig fields of the same name.
TOP_KEYS = (
    "listen", "advertise", "name", "index", "num_peers", "run_dir", "cluster", "profile",
    "join_timeout", "wait_peers", "allow_control", "secret_file", "insecure", "metrics_port",
    "tensorboard",
)  # fmt: skip
CHECKPOINT_KEYS = {
    "checkpoint_dir": "directory",
    "checkpoint_every": "every_steps",
    "checkpoint_seconds": "every_seconds",
    "checkpoint_keep": "keep",
}


def own_loop_config(kw: dict[str, Any]) -> PeerConfig:
    """PeerConfig for a GossipOptimizer: the file a launcher wrote (GOSSIP_TRAIN_CONFIG, by
    ``gossip-train run``) or the defaults, then the keyword arguments over it."""
    path = _env("CONFIG")
    if path is not None:
        base = load_config(path)
    elif slurm_wanted(None, os.environ):
        # Under srun: the same settings `gossip-train peer --slurm` takes (index, size,
        # addresses, seeds, run folder, checkpoints) from SLURM_*.
        port_base = int(_env("SLURM_PORT_BASE") or slurm.DEFAULT_PORT_BASE)
        base = slurm_defaults(PeerConfig(), os.environ, port_base)
    else:
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        base = PeerConfig(index=int(rank), num_peers=int(world), linger_seconds=LaunchConfig.linger)
    top: dict[str, Any] = {k: kw[k] for k in TOP_KEYS if kw.get(k) is not None}
    join = kw.get("join")
    if join is not None:
        if isinstance(join, str):
            join = [a.strip() for a in join.split(",") if a.strip()]
        top["join"] = tuple(join)
    if kw.get("linger") is not None:
        top["linger_seconds"] = float(kw["linger"])
    ckpt = {CHECKPOINT_KEYS[k]: kw[k] for k in CHECKPOINT_KEYS if kw.get(k) is not None}
    schedule = base.schedule
    if kw.get("period") is not None:
        schedule = dataclasses.replace(schedule, period_steps=int(kw["period"]))
    return dataclasses.replace(
        base,
        checkpoint=dataclasses.replace(base.checkpoint, **ckpt),
        schedule=schedule,
        **top,
    )


class GossipOptimizer:
    """Wraps the user's optimizer: ``step()`` updates under the weights lock and gossips.

    Build it after the model is on its device. ``state`` is a dict of plain values (ints,
    floats, strings, lists, dicts, tensors) saved in every checkpoint and restored on
    resume; ``resumed_step`` says at which step (0: a fresh start). ``scheduler`` (an LR
    scheduler of the inner optimizer) is checkpointed too; keep stepping it yourself.
    ``evaluate(model) -> dict`` is called on the final weights (after lingering, under
    ``torch.no_grad()``) and its
    metrics go into this peer's record, with whatever ``report()`` added.
    Keyword arguments match the ``gossip-train peer`` flags: ``listen``, ``advertise``,
    ``join``, ``name``, ``index``, ``num_peers``, ``run_dir``, ``checkpoint_dir``,
    ``checkpoint_every``, ``checkpoint_seconds``, ``checkpoint_keep``, ``period``,
    ``linger``, ``cluster``, ``profile``, ``join_timeout``, ``wait_peers``, ``allow_control``,
    ``secret_file`` (the swarm's keyring), ``insecure``, ``metrics_port`` (live Prometheus
    metrics), ``tensorboard`` (a folder for TensorBoard scalars). Under
    ``gossip-train run`` they start from the settings the launcher wrote for this copy.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        *,
        scheduler: Any = None,
        state: dict[str, Any] | None = None,
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        start_timeout: float = 120.0,
        **settings: Any,
    ) -> None:
        from .config import ConfigError

        known = {
            "listen", "advertise", "join", "name", "index", "num_peers", "run_dir",
            "checkpoint_dir", "checkpoint_every", "checkpoint_seconds", "checkpoint_keep",
            "period", "linger", "cluster", "profile", "join_timeout", "wait_peers",
            "allow_control", "secret_file", "insecure", "metrics_port", "tensorboard",
        }  # fmt: skip
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"GossipOptimizer: unknown setting(s) {', '.join(unknown)}")
        if not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"GossipOptimizer wraps an optimizer, got {type(optimizer).__name__}")
        threads = _env("THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        from .flags import validate

        self.config = own_loop_config(settings)
        validate(self.config)
        self.optimizer = optimizer
        self.loop = OwnLoop(
            model,
            optimizer,
            scheduler,
            self.config.index,
            self.config.num_peers,
            state if state is not None else {},
            evaluate,
        )
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._agent, name="gossip-agent", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        deadline = time.monotonic() + start_timeout
        while not self.loop.started.wait(0.05):
            if not self._thread.is_alive():
                self._raise_agent_error()
            if time.monotonic() > deadline:
                raise GossipError(f"the gossip peer did not start within {start_timeout:.0f} s")
        if self._error is not None:
            self._raise_agent_error()
        self.resumed_step = self.loop.step
        self.state = self.loop.user_state

    # -- the agent thread ----------------------------------------------------------------------
    def _agent(self) -> None:
        from p2p.framing import Limits
        from p2p.transport import TcpTransport

        from .peer import Peer, open_events
        from .runtime import run_async

        fd = _env("EVENTS_FD")
        limits = Limits(max_payload=max(64 << 20, 2 * self.loop.weights.nbytes))
        try:
            events = open_events(self.config.run_dir, int(fd) if fd is not None else None)
            peer = Peer(self.config, self.loop, TcpTransport(limits), events)
            self.peer = peer
            try:
                self._result = run_async(peer.run())
            finally:
                events.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the user's thread
            self._error = exc
            self.loop.started.set()  # nobody waits forever on a peer that never started

    def _at_exit(self) -> None:
        """The interpreter exits without close() (an uncaught exception, ``sys.exit``): the
        peer sees its loop's thread end and fails; wait for it (its last checkpoint write, its
        leave) before Python finalizes. A daemon thread still inside torch then would be
        unwound by pthread_exit and abort the process (SIGABRT) instead of letting it exit
        with the script's own status."""
        if not self._closed:
            self._thread.join(EXIT_TIMEOUT)

    def _raise_agent_error(self) -> None:
        exc = self._error
        if exc is None:
            raise GossipError("the gossip peer stopped")
        raise GossipError(f"gossip peer failed: {exc}") from exc

    # -- what the user's loop calls --------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._error is not None:
            self._raise_agent_error()
        if self._closed:
            raise GossipError("step() after close()")
        return self.loop.user_step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def step_count(self) -> int:
        """Steps taken, counting those before a resume."""
        return self.loop.step

    def report(self, **metrics: float) -> None:
        """Add metrics to this peer's record (summary.json); ``loss`` also shows live."""
        clean = {k: float(v) for k, v in metrics.items()}
        self.loop.last_metrics.update(clean)
        if "loss" in clean and math.isfinite(clean["loss"]):
            self.loop.loss = clean["loss"]
        if "samples" in clean:
            self.loop.samples = int(clean["samples"])

    def close(self, timeout: float | None = None) -> dict[str, Any]:
        """End the loop: linger, save the final model, leave; return this peer's result."""
        if not self._closed:
            self._closed = True
            atexit.unregister(self._at_exit)
            self.loop.stop.set()
            limit = timeout or self.config.linger_seconds + 60.0
            self._thread.join(limit)
            if self._thread.is_alive():
                raise GossipError(f"the gossip peer did not finish within {limit:.0f} s")
        if self._error is not None:
            self._raise_agent_error()
        assert self._result is not None
        return self._result

    def __enter__(self) -> GossipOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
