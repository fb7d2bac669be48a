"""The built-in image classifiers: ``--dataset`` (the bundled MNIST subset, MNIST or
Fashion-MNIST from IDX files) with ``--model`` (``mlp``: 784-128-10, or ``cnn``), Adam.

This is the task ``gossip-train local`` runs when no ``--task`` is given, so the
``--dataset/--model/--data-dir/--partition`` flags mean what they always did. Its optimizer
is ``FlatAdam`` (``trainer.optim``): ``torch.optim.Adam``'s update over the flat weight
vector, which both of these models suit (every parameter gets a gradient every step).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Subset, TensorDataset

from trainer.data import dataset_for
from trainer.models import build_model
from trainer.optim import FlatAdam
from trainer.partition import partition as partition_indices

DEFAULTS = {"batch_size": 32, "lr": 1e-3}


def model(dataset: str = "default", arch: str = "mlp") -> nn.Module:
    del dataset  # every bundled data set is 1 x 28 x 28 with 10 classes
    return build_model(arch, (1, 28, 28), 10)


def data(
    peer: int,
    peers: int,
    dataset: str = "default",
    data_dir: str | None = None,
    partition: str = "iid",
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[Any, Any]:
    ds = dataset_for(dataset, data_dir)
    shard = partition_indices(
        ds.y_train.numpy(), peers, peer, partition, seed, min_samples=batch_size
    )
    train = Subset(TensorDataset(ds.x_train, ds.y_train), shard.tolist())
    return train, TensorDataset(ds.x_test, ds.y_test)


def optimizer(params: list[nn.Parameter], lr: float = 1e-3) -> FlatAdam:
    return FlatAdam(params, lr=lr)
