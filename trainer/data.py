"""Data sets as tensors, and a resumable batcher.

Everything is held in memory as tensors: MNIST-sized data is 188 MB as float32, and indexing
in-memory tensors is far cheaper than a DataLoader with per-sample Python on a loaded laptop.
Reading the files is ``trainer.idx`` (numpy only).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .idx import DATASETS, DEFAULT_ASSET, SPECS, DataError, Spec, load_arrays, read_idx

__all__ = [
    "DATASETS",
    "DEFAULT_ASSET",
    "BatchIterator",
    "DataError",
    "Dataset",
    "build_dataset",
    "load_dataset",
    "read_idx",
]


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set held in memory, already normalized."""

    name: str  # one of DATASETS
    x_train: torch.Tensor  # float32, N x 1 x 28 x 28, normalized with the set's mean/std
    y_train: torch.Tensor  # int64, N, values in [0, num_classes)
    x_test: torch.Tensor  # float32, M x 1 x 28 x 28, same normalization as x_train
    y_test: torch.Tensor  # int64, M
    num_classes: int  # number of label values
    input_shape: tuple[int, ...]  # shape of one sample, (1, 28, 28)


def _normalize(images: np.ndarray, spec: Spec) -> torch.Tensor:
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)
    return x.div_(255.0).sub_(spec.mean).div_(spec.std)


def build_dataset(name: str, arrays: dict[str, np.ndarray]) -> Dataset:
    """Tensors from ``trainer.idx.load_arrays``'s arrays: images normalized to float32."""
    spec = SPECS[name]
    return Dataset(
        name=name,
        x_train=_normalize(arrays["x_train"], spec),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=_normalize(arrays["x_test"], spec),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=spec.num_classes,
        input_shape=(1, 28, 28),
    )


def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """Load a data set by name into memory (see ``trainer.idx.load_arrays`` for where from)."""
    arrays, _ = load_arrays(name, data_dir)
    return build_dataset(name, arrays)


# --------------------------------------------------------------------------- batching


def epoch_seed(seed: int, peer_index: int, epoch: int) -> int:
    """A 63-bit generator seed mixing (seed, peer_index, epoch) so no two triples collide."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, peer_index, epoch), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class BatchIterator:
    """Endless shuffled minibatches over one partition, resumable to the exact batch.

    Each epoch visits every index once in an order drawn by a torch.Generator seeded from
    (seed, peer_index, epoch), so the order depends on nothing else; `next()` rolls into the
    next epoch by itself (the last batch of an epoch may be short). The state is (epoch,
    position, generator state at the epoch's start), all plain ints and a uint8 tensor, so it
    fits a `torch.load(weights_only=True)` checkpoint.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int,
        peer_index: int = 0,
    ) -> None:
        self._x, self._y = x, y
        self._indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if self._indices.ndim != 1 or len(self._indices) == 0:
            raise ValueError("BatchIterator needs a non-empty 1-D index array")
        if int(self._indices.min()) < 0 or int(self._indices.max()) >= len(x) or len(x) != len(y):
            raise ValueError(f"BatchIterator indices must lie in [0, {len(x)}) for x and y alike")
        if batch_size < 1:
            raise ValueError(f"BatchIterator batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.peer_index = peer_index
        self._gen = torch.Generator()
        self._start_epoch(0)

    @property
    def num_samples(self) -> int:
        return len(self._indices)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _start_epoch(self, epoch: int, gen_state: torch.Tensor | None = None) -> None:
        if gen_state is None:
            self._gen.manual_seed(epoch_seed(self.seed, self.peer_index, epoch))
        else:
            self._gen.set_state(gen_state)
        self._epoch_gen_state = self._gen.get_state()
        self._order = self._indices[torch.randperm(self.num_samples, generator=self._gen)]
        self.epoch = epoch
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.num_samples:
            self._start_epoch(self.epoch + 1)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return self._x.index_select(0, idx), self._y.index_select(0, idx)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self._epoch_gen_state.clone(),
            "seed": self.seed,
            "peer_index": self.peer_index,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by state_dict() for the same seed, peer and partition size."""
        mine = (self.seed, self.peer_index, self.num_samples)
        theirs = (state.get("seed"), state.get("peer_index"), state.get("num_samples"))
        if mine != theirs:
            raise ValueError(f"data cursor is for (seed, peer, samples)={theirs}, not {mine}")
        epoch, position, gen = state["epoch"], state["position"], state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError("data cursor generator state must be a uint8 tensor")
        if not (0 <= int(epoch) and 0 <= int(position) <= self.num_samples):
            raise ValueError(f"data cursor epoch={epoch} position={position} is out of range")
        self._start_epoch(int(epoch), gen)
        self.position = int(position)
