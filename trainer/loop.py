"""The local training loop over a task, read top to bottom. Gossip enters at one marked point.

``Trainer.run`` executes on a dedicated thread so the peer's event loop keeps answering
pings while torch holds the CPU. Each optimizer update holds ``weights.lock``; averaging
(a snapshot or a mix from ``gossip.exchange``) takes the same lock, so a snapshot is never
half-updated and a mix never races the update. Forward and backward run without it: a mix
may land between them, and that step's gradient is then one average stale, which is the
inconsistent read asynchronous decentralized SGD (AD-PSGD) allows for.

``TrainerBase`` is what the peer needs of any training driver (weights, step counters,
checkpoints, evaluation); ``Trainer`` is our loop over a task, and
``trainer.own_loop.OwnLoop`` is the user's own loop behind ``GossipOptimizer``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    BackgroundCheckpointer,
    CheckpointError,
    CheckpointStore,
    _clone_tree,
    build_checkpoint,
    capture_rng,
    restore_rng,
    restore_training_state,
    snapshot_model_optimizer,
    validate_compatible,
)
from .config import CheckpointConfig, TrainConfig
from .data import Batches, batch_size_of, to_device
from .poison import Poison
from .task import Task, TaskError, load_task
from .weights import FlatWeights

log = logging.getLogger(__name__)

# Checkpoint config keys that must agree with the peer resuming from it.
COMPAT_KEYS = ("task", "model", "dataset", "partition", "seed", "peer_index", "num_peers")
# How often (in steps) the loop checks that no averaged tensor was swapped out of the flat
# vector behind gossip's back (an assignment, a .to()).
BOUND_CHECK_EVERY = 100


@dataclass
class StepInfo:
    step: int
    loss: float
    epoch: float | None
    metrics: dict[str, float] | None = None  # on steps where eval_every says so
    samples: int = 0


class NonFiniteLoss(TaskError):
    """The loss became NaN or infinite: this peer stops and shares nothing more."""


def task_context(cfg: TrainConfig) -> dict[str, Any]:
    """The run settings a task function may ask for by name (see trainer.task)."""
    return {
        "seed": cfg.seed,
        "partition": cfg.partition,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "data_dir": cfg.data_dir,
        "dataset": cfg.dataset,
        "arch": cfg.model,
        "steps": cfg.steps,
    }


def load_task_for(cfg: TrainConfig) -> Task:
    task = load_task(cfg.task)
    # The task's DEFAULTS fill what the user did not set; the context carries the result.
    ctx = task_context(cfg)
    for key in ("batch_size", "lr"):
        if ctx.get(key) is None and key in task.defaults:
            ctx[key] = task.defaults[key]
    ctx["batch_size"] = ctx.get("batch_size") or 32
    task.context = ctx
    return task


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TaskError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TaskError(f"--device {name}: CUDA is not available on this machine")
    return device


@dataclass
class _CkptClock:
    step: int = 0
    t: float = field(default_factory=time.monotonic)


class TrainerBase:
    """Weights, counters, checkpoints and evaluation: what a peer needs of a training driver."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any = None
    total_steps: int | None = None
    shard_size: int | None = None

    def __init__(self, model: torch.nn.Module, peer_index: int, num_peers: int) -> None:
        self.model = model
        self.peer_index = peer_index
        self.num_peers = num_peers
        self.weights = FlatWeights(model)
        self.step = 0
        self.samples = 0
        self.loss = math.nan
        self.step_seconds = 0.0  # exponential moving average of one step's time
        # A straggler knob for experiments: sleep this fraction of each step's compute time.
        self.slowdown = 0.0
        # A hostile-member knob for experiments (trainer.poison): set, it rewrites the
        # weights after every update, so what this peer sends in exchanges is the poison.
        self.poison: Poison | None = None
        self.checkpointer: BackgroundCheckpointer | None = None
        self.ckpt_cfg = CheckpointConfig()
        self.ckpt_meta: dict = {}  # peers and incarnation, refreshed by the peer
        self._last_ckpt = _CkptClock()
        self.resumed_from: str | None = None
        # Infrequent averaging's outer state (gossip.outer.OuterStore, set by the peer): saved
        # in every checkpoint; what the resumed checkpoint held waits in resumed_outer.
        self.outer: Any = None
        self.resumed_outer: dict[str, Any] | None = None
        self.checkpoint_stall = 0.0  # longest time a checkpoint snapshot held the step lock
        self.last_metrics: dict[str, float] = {}

    # -- what subclasses fill in -------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this trainer."""
        return {"peer_index": self.peer_index, "num_peers": self.num_peers}

    def extra_state(self) -> dict[str, Any]:
        """More to checkpoint (the data cursor, a user's state), taken under the step lock."""
        return {}

    def load_extra(self, ckpt: dict[str, Any], source: str) -> None:
        """Restore what ``extra_state`` saved."""

    def evaluate(self, locked: bool = False) -> dict[str, float]:
        """This peer's metrics: its evaluation, or what its own loop reported."""
        return dict(self.last_metrics)

    # -- checkpoints ---------------------------------------------------------------------------
    def enable_checkpoints(self, cfg: CheckpointConfig) -> dict | None:
        """Open the checkpoint folder, resume from its newest good file; return that file."""
        assert cfg.directory is not None
        store = CheckpointStore(Path(cfg.directory), keep=cfg.keep)
        found = store.latest()
        if found is not None:
            ckpt, path = found
            source = f"checkpoint {path}"
            mine = self.identity()
            # Another task first and alone: its other settings would only blur the message.
            validate_compatible(ckpt["config"], mine, keys=["task"], source=source)
            validate_compatible(
                ckpt["config"], mine, keys=[k for k in COMPAT_KEYS if k in mine], source=source
            )
            restore_training_state(ckpt, self.model, self.optimizer, source=source)
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                try:
                    self.scheduler.load_state_dict(ckpt["scheduler"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise CheckpointError(
                        f"{source}: scheduler state does not fit ({exc})"
                    ) from None
            self.load_extra(ckpt, source)
            outer = ckpt.get("outer")
            self.resumed_outer = outer if isinstance(outer, dict) else None
            restore_rng(ckpt["rng"])
            self.step = ckpt["step"]
            self.samples = int(ckpt["config"].get("samples", 0))
            self.resumed_from = str(path)
            log.info("resumed from %s at step %d", path, self.step)
        set_aside_unreadable(store, found[1] if found else None)
        self.ckpt_cfg = cfg
        self.checkpointer = BackgroundCheckpointer(store)
        self._last_ckpt = _CkptClock(self.step)
        return found[0] if found else None

    def checkpoint_due(self) -> bool:
        cfg, last = self.ckpt_cfg, self._last_ckpt
        by_steps = cfg.every_steps > 0 and self.step - last.step >= cfg.every_steps
        by_time = cfg.every_seconds > 0 and time.monotonic() - last.t >= cfg.every_seconds
        return self.checkpointer is not None and (by_steps or by_time)

    def checkpoint_now(self, wait: bool = False) -> None:
        """Copy the state under the step lock; a background thread serializes and writes.

        With ``wait`` the write happens here and a failure raises CheckpointError: the peer
        does that once at start, so a full or unwritable folder stops it before it joins.
        """
        if self.checkpointer is None:
            return
        t0 = time.perf_counter()
        with self.weights.lock:
            model, optim = snapshot_model_optimizer(self.model, self.optimizer)
            sched = _clone_tree(self.scheduler.state_dict()) if self.scheduler else None
            extra = _clone_tree(self.extra_state())
            outer = self.outer.state() if self.outer is not None else None
        self.checkpoint_stall = max(self.checkpoint_stall, time.perf_counter() - t0)
        meta = self.ckpt_meta
        state = build_checkpoint(
            model=model,
            optimizer=optim,
            step=self.step,
            data=extra.pop("data", {}),
            rng=capture_rng(),
            config={**self.identity(), "samples": self.samples},
            peers=meta.get("peers", ()),
            incarnation=int(meta.get("incarnation", 0)),
        )
        state["scheduler"] = sched
        if outer is not None:
            outer["weights"] = torch.from_numpy(outer["weights"])
            outer["momentum"] = torch.from_numpy(outer["momentum"])
            state["outer"] = outer
        state.update(extra)
        if wait:
            self.checkpointer.store.save(state)
        else:
            self.checkpointer.submit(state)
        self._last_ckpt = _CkptClock(self.step)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close(timeout=10.0)

    def after_update(self) -> None:
        """Called under the weights lock right after each optimizer update."""
        poison = self.poison
        if poison is not None:
            poison.apply(self.weights.flat)

    def run(self, stop: threading.Event, on_step: Callable[[StepInfo], None]) -> None:
        raise NotImplementedError

    async def drive(self, stop: threading.Event, on_step: Callable[[StepInfo], None]) -> None:
        """The peer's part: train until done or ``stop``; our loop runs on a thread of its own."""
        await asyncio.to_thread(self.run, stop, on_step)


class Trainer(TrainerBase):
    """Our loop over a task: batches from the task's data, its loss, optimizer and metrics."""

    def __init__(
        self, cfg: TrainConfig, peer_index: int, num_peers: int, task: Task | None = None
    ) -> None:
        self.cfg = cfg
        self.task = task or load_task_for(cfg)
        ctx = self.task.context
        self.device = resolve_device(cfg.device)
        self.batch_size = int(ctx["batch_size"])
        clip = cfg.clip_grad if cfg.clip_grad is not None else self.task.defaults.get("clip_grad")
        self.clip_grad = float(clip or 0.0)
        train_set, self.eval_set = self.task.datasets(peer_index, num_peers)
        self.batches = Batches(
            train_set, self.batch_size, cfg.seed, peer_index, workers=cfg.loader_workers
        )
        total = self._total_steps()
        ctx["steps"] = total  # a scheduler(optimizer, steps=...) sees the run's length
        model = self.task.build_model(cfg.seed).to(self.device)
        super().__init__(model, peer_index, num_peers)
        self.total_steps = total
        self.shard_size = self.batches.num_samples
        self.optimizer = self.task.optimizer(model, self.weights.params)
        self.scheduler = self.task.scheduler(self.optimizer)

    def _total_steps(self) -> int:
        """--steps, else --epochs, else the task's DEFAULTS (steps, then epochs), else 1 epoch."""
        cfg, defaults = self.cfg, self.task.defaults
        if cfg.steps:
            return int(cfg.steps)
        if cfg.epochs is None and defaults.get("steps"):
            return int(defaults["steps"])
        epochs = cfg.epochs if cfg.epochs is not None else float(defaults.get("epochs", 1.0))
        return max(1, math.ceil(epochs * self.batches.batches_per_epoch))

    def identity(self) -> dict[str, Any]:
        c, ctx = self.cfg, self.task.context
        classifier = self.task.name == "classifier"  # the one task that reads these two
        return {
            "task": self.task.name,
            "task_source": self.task.source,
            "model": c.model if classifier else None,
            "dataset": c.dataset if classifier else None,
            "partition": c.partition,
            "seed": c.seed,
            "peer_index": self.peer_index,
            "num_peers": self.num_peers,
            "batch_size": self.batch_size,
            "lr": ctx.get("lr"),
            "epochs": c.epochs,
            "steps": self.total_steps,
            "data_dir": c.data_dir,
            "schema": self.weights.schema,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"data": self.batches.state_dict()}

    def load_extra(self, ckpt: dict[str, Any], source: str) -> None:
        try:
            self.batches.load_state_dict(ckpt["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def close(self) -> None:
        self.batches.close()
        super().close()

    def run(self, stop: threading.Event, on_step: Callable[[StepInfo], None]) -> None:
        """Train until ``total_steps`` or ``stop`` is set. Runs on the training thread."""
        model, opt, sched, lock = self.model, self.optimizer, self.scheduler, self.weights.lock
        task, clip, total = self.task, self.clip_grad, self.total_steps or 0
        assert total > 0
        model.train()
        while self.step < total and not stop.is_set():
            batch = to_device(next(self.batches), self.device)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss is {value} at step {self.step + 1}: this peer stops training and "
                    "shares no more weights (its last good weights are kept)"
                )
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.weights.params, clip)
            with lock:  # only the update: gossip may snapshot or mix during fwd/bwd
                opt.step()
                self.after_update()
            if sched is not None:
                sched.step()
            dt = time.perf_counter() - t0
            self.step_seconds = dt if self.step == 0 else 0.98 * self.step_seconds + 0.02 * dt
            self.step += 1
            self.samples += batch_size_of(batch)
            self.loss = value
            if self.slowdown > 0:
                time.sleep(dt * self.slowdown)
            if self.step % BOUND_CHECK_EVERY == 0:
                self.weights.check_bound()
            if self.checkpoint_due():
                self.checkpoint_now()
            # ---- gossip enters here: between steps, the peer may snapshot or mix weights ----
            metrics = None
            every = self.cfg.eval_every
            if every > 0 and (self.step % every == 0 or self.step == total):
                metrics = self.evaluate()
            epoch = self.step / self.batches.batches_per_epoch
            on_step(StepInfo(self.step, value, epoch, metrics, self.samples))

    def evaluate(self, locked: bool = False) -> dict[str, float]:
        """The task's metrics on its evaluation set ({} without one). With ``locked`` the
        weights lock is held throughout, so no exchange lands mid-evaluation."""
        if self.eval_set is None:
            return {}
        if locked:
            with self.weights.lock:
                return self._evaluate()
        return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        size = self.cfg.eval_batch_size
        self.last_metrics = self.task.evaluate(self.model, self.eval_set, size, self.device)
        return dict(self.last_metrics)


def set_aside_unreadable(store: CheckpointStore, resumed: Path | None) -> None:
    """Rename checkpoints newer than the one resumed from (they failed to load) to *.corrupt.

    Left in place they would outrank every checkpoint written from now on, and keep-K
    rotation would delete each new checkpoint as soon as it is written. Renamed, they stay
    on disk for inspection and out of the rotation.
    """
    paths = store.list()
    newer = paths[paths.index(resumed) + 1 :] if resumed in paths else paths
    for path in newer:
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as exc:
            reason = f"does not load, cannot rename it ({exc.strerror or exc})"
            raise CheckpointError(f"checkpoint {path}: {reason}") from None
        log.warning("checkpoint %s does not load; renamed to %s", path, aside.name)
