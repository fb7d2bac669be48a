"""Data sets as tensors, and a resumable batcher.

Everything is held in memory as tensors: MNIST-sized data is 188 MB as float32, and indexing
in-memory tensors is far cheaper than a DataLoader with per-sample Python on a loaded laptop.
Reading the files is ``trainer.idx`` (numpy only).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
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
    "Batches",
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


class Batches:
    """Endless shuffled minibatches over a map-style Dataset, resumable to the exact batch.

    Each epoch visits every index once in an order drawn by a torch.Generator seeded from
    (seed, peer_index, epoch), so the order depends on nothing else; ``next()`` rolls into
    the next epoch by itself (the last batch of an epoch may be short). The state is (epoch,
    position, generator state at the epoch's start), all plain ints and a uint8 tensor, so
    it fits a ``torch.load(weights_only=True)`` checkpoint.

    Samples are fetched as ``dataset[i]`` and collated with ``collate`` (torch's
    ``default_collate``), except for a ``TensorDataset`` or a ``Subset`` of one, whose
    batches are gathered with one ``index_select`` per tensor. With ``workers > 0`` a
    ``DataLoader`` with that many worker processes fetches ahead along the same order; the
    state is what was consumed, not what was fetched, so a resume is exact either way.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        peer_index: int = 0,
        *,
        workers: int = 0,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.peer_index = peer_index
        self.workers = workers
        self._collate = collate or _default_collate
        self._fetch = _tensor_fetcher(dataset) or self._fetch_items
        self._n = len(dataset)
        self._gen = torch.Generator()
        self._loader: Iterator[Any] | None = None
        self._start_epoch(0)

    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _start_epoch(self, epoch: int, gen_state: torch.Tensor | None = None) -> None:
        if gen_state is None:
            self._gen.manual_seed(epoch_seed(self.seed, self.peer_index, epoch))
        else:
            self._gen.set_state(gen_state)
        self._epoch_gen_state = self._gen.get_state()
        self._order = torch.randperm(self.num_samples, generator=self._gen)
        self.epoch = epoch
        self.position = 0

    def _next_indices(self) -> torch.Tensor:
        if self.position >= self.num_samples:
            self._start_epoch(self.epoch + 1)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return idx

    def _fetch_items(self, idx: torch.Tensor) -> Any:
        return self._collate([self.dataset[i] for i in idx.tolist()])

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.workers <= 0:
            return self._fetch(self._next_indices())
        if self._loader is None:
            self._loader = self._start_loader()
        self._next_indices()  # the consumed cursor moves in step with the loader
        return next(self._loader)

    def _start_loader(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        # A second cursor, from this one's state, runs ahead to feed the workers.
        ahead = Batches(self.dataset, self.batch_size, self.seed, self.peer_index)
        ahead.load_state_dict(self.state_dict())

        def index_batches() -> Iterator[list[int]]:
            while True:
                yield ahead._next_indices().tolist()

        loader = DataLoader(
            self.dataset,
            batch_sampler=_Endless(index_batches),
            num_workers=self.workers,
            collate_fn=self._collate,
        )
        return iter(loader)

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
        """Restore a cursor saved by state_dict() for the same seed, peer and data size."""
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
        self._loader = None  # a loader restarts from the restored cursor

    def close(self) -> None:
        """Stop the loader's worker processes, if any."""
        self._loader = None


class _Endless:
    """A batch sampler without a length (DataLoader asks for one only if it exists)."""

    def __init__(self, make: Callable[[], Iterator[list[int]]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[list[int]]:
        return self._make()


def _default_collate(items: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(items)


def _tensor_fetcher(dataset: Any) -> Callable[[torch.Tensor], Any] | None:
    """Batched gathering for a TensorDataset, or nested Subsets of one; None otherwise."""
    from torch.utils.data import Subset, TensorDataset

    chain: list[torch.Tensor] = []
    inner = dataset
    while isinstance(inner, Subset):
        chain.append(torch.as_tensor(inner.indices, dtype=torch.int64))
        inner = inner.dataset
    if not isinstance(inner, TensorDataset):
        return None
    tensors = inner.tensors

    def fetch(idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for mapping in chain:
            idx = mapping.index_select(0, idx)
        return tuple(t.index_select(0, idx) for t in tensors)

    return fetch


class BatchIterator(Batches):
    """``Batches`` over rows ``indices`` of in-memory tensors ``x`` and ``y``."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int,
        peer_index: int = 0,
    ) -> None:
        from torch.utils.data import Subset, TensorDataset

        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if idx.ndim != 1 or len(idx) == 0:
            raise ValueError("BatchIterator needs a non-empty 1-D index array")
        if int(idx.min()) < 0 or int(idx.max()) >= len(x) or len(x) != len(y):
            raise ValueError(f"BatchIterator indices must lie in [0, {len(x)}) for x and y alike")
        super().__init__(Subset(TensorDataset(x, y), idx.tolist()), batch_size, seed, peer_index)


def eval_batches(dataset: Any, batch_size: int, collate: Callable[[list[Any]], Any] | None = None):
    """Sequential batches over a whole evaluation set (the last one may be short)."""
    fetch = _tensor_fetcher(dataset)
    collate = collate or _default_collate
    n = len(dataset)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        if fetch is not None:
            yield fetch(idx)
        else:
            yield collate([dataset[i] for i in idx.tolist()])


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (1 if it has none)."""
    first = batch
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    return len(first) if isinstance(first, torch.Tensor) and first.ndim else 1


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (tuples, lists, dicts) moved to ``device``."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# Data sets loaded before forking (see trainer.launch.zygote), shared copy-on-write by the peers.
_PRELOADED: dict[tuple[str, str | None], Dataset] = {}


def register_preloaded(name: str, data_dir: str | None, data: Dataset) -> None:
    """Make ``data`` what every task of this process (and its forks) uses for the set."""
    _PRELOADED[(name, data_dir)] = data


def dataset_for(name: str, data_dir: str | None) -> Dataset:
    """A data set by name, from memory when it was loaded before (once per process)."""
    found = _PRELOADED.get((name, data_dir))
    if found is None:
        found = load_dataset(name, Path(data_dir) if data_dir else None)
        register_preloaded(name, data_dir, found)
    return found
