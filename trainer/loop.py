"""The local training loop, read top to bottom. Gossip enters at one marked point.

``Trainer.run`` executes on a dedicated thread so the peer's event loop keeps answering
pings while torch holds the CPU. Each optimizer update holds ``weights.lock``; averaging
(a snapshot or a mix from ``gossip.exchange``) takes the same lock, so a snapshot is never
half-updated and a mix never races the update. Forward and backward run without it: a mix
may land between them, and that step's gradient is then one average stale, which is the
inconsistent read asynchronous decentralized SGD (AD-PSGD) allows for.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    BackgroundCheckpointer,
    CheckpointError,
    CheckpointStore,
    build_checkpoint,
    capture_rng,
    restore_rng,
    restore_training_state,
    snapshot_model_optimizer,
    validate_compatible,
)
from .config import CheckpointConfig, TrainConfig
from .data import BatchIterator, Dataset, load_dataset
from .models import build_model, evaluate
from .optim import FlatAdam
from .partition import partition
from .weights import FlatWeights

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    step: int
    loss: float
    epoch: float
    accuracy: float | None = None  # test accuracy, on steps where eval_every says so


# Data sets loaded before forking (see trainer.zygote), shared copy-on-write by the peers.
_PRELOADED: dict[tuple[str, str | None], Dataset] = {}


def preload_dataset(name: str, data_dir: str | None) -> Dataset:
    data = load_dataset(name, Path(data_dir) if data_dir else None)
    register_preloaded(name, data_dir, data)
    return data


def register_preloaded(name: str, data_dir: str | None, data: Dataset) -> None:
    """Make ``data`` what every Trainer of this process (and its forks) uses for the set."""
    _PRELOADED[(name, data_dir)] = data


def dataset_for(cfg: TrainConfig) -> Dataset:
    found = _PRELOADED.get((cfg.dataset, cfg.data_dir))
    if found is not None:
        return found
    return load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, peer_index: int, num_peers: int, dataset: Dataset | None = None
    ) -> None:
        self.cfg = cfg
        self.peer_index = peer_index
        self.num_peers = num_peers
        self.data = dataset or dataset_for(cfg)
        shard = partition(
            self.data.y_train.numpy(),
            num_peers,
            peer_index,
            cfg.partition,
            cfg.seed,
            min_samples=cfg.batch_size,
        )
        self.batches = BatchIterator(
            self.data.x_train, self.data.y_train, shard, cfg.batch_size, cfg.seed, peer_index
        )
        self.model = build_model(
            cfg.model, self.data.input_shape, self.data.num_classes, seed=cfg.seed
        )
        self.weights = FlatWeights(self.model)
        self.optimizer = FlatAdam(self.weights, lr=cfg.lr)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.total_steps = max(1, math.ceil(cfg.epochs * self.batches.batches_per_epoch))
        self.step = 0
        self.samples = 0
        self.loss = math.nan
        self.step_seconds = 0.0  # exponential moving average of one step's time
        # A straggler knob for experiments: sleep this fraction of each step's compute time.
        self.slowdown = 0.0
        self.checkpointer: BackgroundCheckpointer | None = None
        self.ckpt_cfg = CheckpointConfig()
        self.ckpt_meta: dict = {}  # peers and incarnation, refreshed by the peer
        self._last_ckpt = (0, time.monotonic())
        self.resumed_from: str | None = None
        self.checkpoint_stall = 0.0  # longest time a checkpoint snapshot held the step lock

    # -- checkpoints ---------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint must agree on to be resumed by this trainer."""
        c = self.cfg
        return {
            "model": c.model,
            "dataset": c.dataset,
            "partition": c.partition,
            "seed": c.seed,
            "peer_index": self.peer_index,
            "num_peers": self.num_peers,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "epochs": c.epochs,
            "data_dir": c.data_dir,
        }

    def enable_checkpoints(self, cfg: CheckpointConfig) -> dict | None:
        """Open the checkpoint folder, resume from its newest good file; return that file."""
        assert cfg.directory is not None
        store = CheckpointStore(Path(cfg.directory), keep=cfg.keep)
        found = store.latest()
        if found is not None:
            ckpt, path = found
            validate_compatible(
                ckpt["config"],
                self.identity(),
                keys=("model", "dataset", "partition", "seed", "peer_index", "num_peers"),
                source=f"checkpoint {path}",
            )
            restore_training_state(ckpt, self.model, self.optimizer, source=f"checkpoint {path}")
            try:
                self.batches.load_state_dict(ckpt["data"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {path}: {exc}") from None
            restore_rng(ckpt["rng"])
            self.step = ckpt["step"]
            self.samples = int(ckpt["config"].get("samples", 0))
            self.resumed_from = str(path)
            log.info("resumed from %s at step %d", path, self.step)
        set_aside_unreadable(store, found[1] if found else None)
        self.ckpt_cfg = cfg
        self.checkpointer = BackgroundCheckpointer(store)
        self._last_ckpt = (self.step, time.monotonic())
        return found[0] if found else None

    def _checkpoint_due(self) -> bool:
        cfg, (last_step, last_t) = self.ckpt_cfg, self._last_ckpt
        by_steps = cfg.every_steps > 0 and self.step - last_step >= cfg.every_steps
        by_time = cfg.every_seconds > 0 and time.monotonic() - last_t >= cfg.every_seconds
        return by_steps or by_time

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
            data = self.batches.state_dict()
        self.checkpoint_stall = max(self.checkpoint_stall, time.perf_counter() - t0)
        meta = self.ckpt_meta
        state = build_checkpoint(
            model=model,
            optimizer=optim,
            step=self.step,
            data=data,
            rng=capture_rng(),
            config={**self.identity(), "samples": self.samples},
            peers=meta.get("peers", ()),
            incarnation=int(meta.get("incarnation", 0)),
        )
        if wait:
            self.checkpointer.store.save(state)
        else:
            self.checkpointer.submit(state)
        self._last_ckpt = (self.step, time.monotonic())

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close(timeout=10.0)

    @property
    def shard_size(self) -> int:
        return self.batches.num_samples

    def run(self, stop: threading.Event, on_step: Callable[[StepInfo], None]) -> None:
        """Train until ``total_steps`` or ``stop`` is set. Runs on the training thread."""
        model, opt, lock = self.model, self.optimizer, self.weights.lock
        model.train()
        while self.step < self.total_steps and not stop.is_set():
            x, y = next(self.batches)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = self.loss_fn(model(x), y)
            loss.backward()
            with lock:  # only the update: gossip may snapshot or mix during fwd/bwd
                opt.step()
            dt = time.perf_counter() - t0
            self.step_seconds = dt if self.step == 0 else 0.98 * self.step_seconds + 0.02 * dt
            self.step += 1
            self.samples += len(y)
            self.loss = loss.item()
            if self.slowdown > 0:
                time.sleep(dt * self.slowdown)
            if self.checkpointer is not None and self._checkpoint_due():
                self.checkpoint_now()
            # ---- gossip enters here: between steps, the peer may snapshot or mix weights ----
            acc = None
            every = self.cfg.eval_every
            if every > 0 and (self.step % every == 0 or self.step == self.total_steps):
                acc = self.test_accuracy()
            on_step(StepInfo(self.step, self.loss, self.step / self.batches.batches_per_epoch, acc))

    def test_accuracy(self) -> float:
        with self.weights.lock:
            return evaluate(self.model, self.data.x_test, self.data.y_test)


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
