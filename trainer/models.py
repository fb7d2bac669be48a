"""Models the trainer can build by name, and accuracy evaluation.

No model here uses BatchNorm or other buffers: all state is parameters, so averaging the
parameters averages the whole model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

MODELS = ("mlp", "cnn")


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The seed model: 784-128-10 on MNIST, 101,770 parameters."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers (C->16->32), each followed by 2x2 max-pooling, then one Linear."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ValueError(
            f"model 'cnn': input_shape must be (C, H, W) with H, W >= 4, got {input_shape}"
        )
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), num_classes),
    )


_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": _mlp, "cnn": _cnn}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None
) -> nn.Module:
    """Build a model by name ("mlp" or "cnn").

    With a seed, the initial weights come from that seed alone and the global torch RNG is
    left untouched, so all peers can start from the same point; without one, they come from
    the global RNG as usual.
    """
    if name not in _BUILDERS:
        raise ValueError(f"model {name!r}: unknown (choose from {', '.join(MODELS)})")
    if num_classes < 1 or not input_shape or min(input_shape) < 1:
        raise ValueError(
            f"model {name!r}: bad input_shape {input_shape} or num_classes {num_classes}"
        )
    shape = tuple(int(d) for d in input_shape)
    if seed is None:
        return _BUILDERS[name](shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](shape, num_classes)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy of model on (x, y), in [0, 1]; the model's train/eval mode is restored."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"evaluate: need equal, non-empty x and y, got {len(x)} and {len(y)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                correct += int((model(xb).argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(x)
