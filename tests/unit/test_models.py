"""Models by name, and accuracy evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainer.data import BatchIterator, load_dataset
from trainer.models import MODELS, build_model, evaluate


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names() -> None:
    assert MODELS == ("mlp", "cnn")
    with pytest.raises(ValueError, match=r"model 'resnet': unknown \(choose from mlp, cnn\)"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"model 'cnn': input_shape must be \(C, H, W\)"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ValueError, match=r"bad input_shape"):
        build_model("mlp", (1, 28, 28), 0)


@pytest.mark.parametrize(("name", "params"), [("mlp", 101_770), ("cnn", 20_490)])
def test_forward_shape_param_count_and_no_buffers(name: str, params: int) -> None:
    model = build_model(name, (1, 28, 28), 10)
    assert n_params(model) == params
    # All state is parameters, so averaging parameters averages the whole model.
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {k for k, _ in model.named_parameters()}
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10) and out.dtype == torch.float32


def test_mlp_is_the_seed_architecture() -> None:
    layers = list(build_model("mlp", (1, 28, 28), 10))
    assert [type(m) for m in layers] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[1].in_features, layers[1].out_features) == (784, 128)
    assert (layers[3].in_features, layers[3].out_features) == (128, 10)


def test_cnn_adapts_to_other_shapes() -> None:
    model = build_model("cnn", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_seeded_build_is_reproducible_and_leaves_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = build_model("cnn", (1, 28, 28), 10, seed=42)
    b = build_model("cnn", (1, 28, 28), 10, seed=42)
    c = build_model("cnn", (1, 28, 28), 10, seed=43)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), ka
        assert not torch.equal(pa, pc), ka


class Fixed(nn.Module):
    """Predicts class (first pixel value) for each sample: accuracy is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        return nn.functional.one_hot(x[:, 0].long(), 4).float() * self.w


def test_evaluate_exact_accuracy_batches_and_mode() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [3.0]])
    y = torch.tensor([0, 1, 0, 3, 2])
    model = Fixed()
    model.train()
    assert evaluate(model, x, y, batch_size=2) == pytest.approx(3 / 5)
    assert model.grad_enabled == [False, False, False]  # three batches, no autograd
    assert model.training  # mode restored
    model.eval()
    evaluate(model, x, y)
    assert not model.training
    with pytest.raises(ValueError, match=r"non-empty"):
        evaluate(model, x[:0], y[:0])


def test_mlp_learns_default_dataset() -> None:
    """A short run on the shipped data set lifts test accuracy far above chance."""
    data = load_dataset("default")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    assert evaluate(model, data.x_test, data.y_test) < 0.3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = BatchIterator(data.x_train, data.y_train, np.arange(3000), batch_size=64, seed=0)
    for _ in range(100):
        xb, yb = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert evaluate(model, data.x_test, data.y_test) > 0.8
