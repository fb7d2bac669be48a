"""The local training loop, read top to bottom. Gossip enters at one marked point.

``Trainer.run`` executes on a dedicated thread so the peer's event loop keeps answering
pings while torch holds the CPU. Each step holds ``weights.lock``; averaging (a snapshot
or a mix from ``gossip.exchange``) takes the same lock and so lands between steps.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data import BatchIterator, Dataset, load_dataset
from .models import build_model, evaluate
from .partition import partition
from .weights import FlatWeights

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    step: int
    loss: float
    epoch: float


class Trainer:
    def __init__(
        self, cfg: TrainConfig, peer_index: int, num_peers: int, dataset: Dataset | None = None
    ) -> None:
        self.cfg = cfg
        self.data = dataset or load_dataset(
            cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None
        )
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
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.total_steps = max(1, math.ceil(cfg.epochs * self.batches.batches_per_epoch))
        self.step = 0
        self.samples = 0
        self.loss = math.nan
        self.step_seconds = 0.0  # exponential moving average of one step's time
        # A straggler knob for experiments: sleep this fraction of each step's compute time.
        self.slowdown = 0.0

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
            with lock:
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(x), y)
                loss.backward()
                opt.step()
            dt = time.perf_counter() - t0
            self.step_seconds = dt if self.step == 0 else 0.98 * self.step_seconds + 0.02 * dt
            self.step += 1
            self.samples += len(y)
            self.loss = float(loss)
            if self.slowdown > 0:
                time.sleep(dt * self.slowdown)
            # ---- gossip enters here: between steps, the peer may snapshot or mix weights ----
            on_step(StepInfo(self.step, self.loss, self.step / self.batches.batches_per_epoch))

    def test_accuracy(self) -> float:
        with self.weights.lock:
            return evaluate(self.model, self.data.x_test, self.data.y_test)
