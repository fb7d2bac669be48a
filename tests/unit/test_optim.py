"""FlatAdam: the same numbers as torch.optim.Adam, the same checkpoint layout."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.models import build_model
from trainer.optim import FlatAdam
from trainer.weights import FlatWeights


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = build_model(name, (1, 28, 28), 10, seed=3)
    return ours, copy.deepcopy(ours)


def _train(model: torch.nn.Module, opt, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(steps):
        x = torch.randn(16, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_same_weights_as_torch_adam(name: str) -> None:
    ours, theirs = _pair(name)
    _train(ours, FlatAdam(FlatWeights(ours), lr=1e-3), 60)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3), 60)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)  # element for element, not merely close


def test_state_dict_interchanges_with_torch_adam() -> None:
    ours, theirs = _pair("mlp")
    flat_opt = FlatAdam(FlatWeights(ours), lr=1e-3)
    torch_opt = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    _train(ours, flat_opt, 25)
    _train(theirs, torch_opt, 25)
    sd_ours, sd_theirs = flat_opt.state_dict(), torch_opt.state_dict()
    assert sd_ours["param_groups"] == sd_theirs["param_groups"]
    for i, st in sd_theirs["state"].items():
        for key, value in st.items():
            assert torch.equal(sd_ours["state"][i][key], value), (i, key)

    # torch's state into a fresh FlatAdam, and ours into a fresh torch Adam: both go on
    # exactly as the originals do.
    resumed, resumed_torch = copy.deepcopy(theirs), copy.deepcopy(ours)
    flat_resumed = FlatAdam(FlatWeights(resumed), lr=1e-3)
    flat_resumed.load_state_dict(copy.deepcopy(sd_theirs))
    torch_resumed = torch.optim.Adam(resumed_torch.parameters(), lr=1e-3)
    torch_resumed.load_state_dict(copy.deepcopy(sd_ours))
    runs = ((theirs, torch_opt), (resumed, flat_resumed), (resumed_torch, torch_resumed))
    for model, opt in runs:
        _train(model, opt, 10, seed=1)
    params = (theirs.parameters(), resumed.parameters(), resumed_torch.parameters())
    for a, b, c in zip(*params, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_fresh_state_dict_is_empty_like_torch() -> None:
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    opt = FlatAdam(FlatWeights(model))
    assert opt.state_dict()["state"] == {}
    opt.load_state_dict(opt.state_dict())
    assert opt.steps == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "one Adam"),
        (lambda sd: sd["param_groups"][0].update(params=[0, 1]), "parameters"),
        (lambda sd: sd["param_groups"][0].update(amsgrad=True), "amsgrad"),
        (lambda sd: sd["state"].pop(3), "state for 3"),
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(5)), "exp_avg of parameter 1"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(3.0)), "different step"),
    ],
)
def test_mismatched_state_is_refused(mutate, message: str) -> None:
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    opt = FlatAdam(FlatWeights(model))
    _train(model, opt, 2)
    before = opt.exp_avg.clone()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert torch.equal(opt.exp_avg, before) and opt.steps == 2  # nothing half-loaded
