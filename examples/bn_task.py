"""A task file: a small CNN with BatchNorm, trained with SGD and momentum, on MNIST.

    gossip-train local --task examples/bn_task.py --peers 4 --data-dir ../shared/data/mnist
    gossip-train local --task examples/bn_task.py --peers 4          # the bundled subset

gossip-train calls ``model()`` and ``data(peer, peers)`` and runs its own loop, with
checkpoints, gossip, chaos and the consensus model. Functions may take more keyword
arguments: those named after a run setting (``data_dir``, ``partition``, ``seed``, ``lr``)
receive it, so ``--partition dirichlet:0.5`` and ``--lr`` work here unchanged. BatchNorm's
running mean and variance are averaged with the weights; its step counter stays local.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer import split
from trainer.data import load_dataset

DEFAULTS = {"batch_size": 64, "epochs": 1.0}


def model() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def data(
    peer: int, peers: int, data_dir: str | None = None, partition: str = "iid", seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    ds = load_dataset("mnist" if data_dir else "default", data_dir)
    train = TensorDataset(ds.x_train, ds.y_train)
    return split(train, peer, peers, partition, seed), TensorDataset(ds.x_test, ds.y_test)


def optimizer(params: list[nn.Parameter], lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


# loss() and metrics() are left out: cross-entropy, and accuracy with mean loss.
