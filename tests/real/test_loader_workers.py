"""Batches with loader worker processes: the same batches as in-process, resumed exactly."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from trainer.data import Batches


class Squares(Dataset):
    """A map-style data set that is not a TensorDataset: the general fetch path."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), float(i * i)]), i % 3


def _take(batches: Batches, n: int) -> list[torch.Tensor]:
    return [next(batches)[0].clone() for _ in range(n)]


def test_loader_workers_give_the_same_batches_and_resume_exactly() -> None:
    plain = _take(Batches(Squares(), 8, seed=0), 20)
    workers = Batches(Squares(), 8, seed=0, workers=2)
    first = _take(workers, 9)
    state = workers.state_dict()
    workers.close()
    again = Batches(Squares(), 8, seed=0, workers=2)
    again.load_state_dict(state)
    rest = _take(again, 11)
    again.close()
    for a, b in zip(plain, first + rest, strict=True):
        assert torch.equal(a, b)
