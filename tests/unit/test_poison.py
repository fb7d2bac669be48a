"""The chaos tool's poisoned weights (trainer.poison) and where the loop applies them."""

import threading

import pytest
import torch

from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.poison import Poison, check


def weights(seed=0, n=5000):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_zero_and_negate():
    w = weights()
    Poison("zero").apply(w)
    assert not w.any()
    w, before = weights(), weights()
    poison = Poison("negate")
    poison.apply(w)
    assert torch.equal(w, -before)
    # Step after step it stays the negation of the start plus every update since.
    clean = before.clone()
    for k in range(5):
        update = 0.001 * weights(k + 1)
        w += update
        clean += update
        poison.apply(w)
        assert torch.allclose(w, -clean, atol=1e-6)


def test_scale_pins_the_norm_instead_of_compounding():
    w = weights()
    start = float(w.norm())
    poison = Poison("scale")  # factor 10 by default
    poison.apply(w)  # the norm when the poison begins is what it pins to 10x
    for _ in range(100):  # every step: training moves w a little, the poison rescales it
        w += 0.001 * weights(1)
        poison.apply(w)
        assert float(w.norm()) == pytest.approx(10 * start, rel=1e-5)
    w = weights()
    Poison("scale", 0.5).apply(w)
    assert float(w.norm()) == pytest.approx(0.5 * start, rel=1e-5)


def test_noise_is_fresh_each_step_over_the_weights_underneath():
    clean = weights()
    w = clean.clone()
    rms = float(clean.norm()) / clean.numel() ** 0.5
    poison = Poison("noise")
    seen = []
    for _ in range(20):
        poison.apply(w)
        noise = w - clean
        assert float(noise.std()) == pytest.approx(10 * rms, rel=0.1)  # not a random walk
        seen.append(noise.clone())
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize(
    ("mode", "factor", "needle"),
    [
        ("flip", None, "unknown poison mode"),
        ("zero", 2.0, "takes no factor"),
        ("scale", 0.0, "positive"),
        ("noise", float("nan"), "positive"),
        ("scale", "big", "a number"),
        ("scale", True, "a number"),
    ],
)
def test_bad_modes_and_factors(mode, factor, needle):
    assert needle in check(mode, factor)
    with pytest.raises(ValueError, match=needle):
        Poison(mode, factor)
    assert check("scale", 3) is None and check("negate", None) is None


def test_the_loop_poisons_the_weights_after_every_update_under_the_lock():
    trainer = Trainer(TrainConfig(steps=4, batch_size=8), 0, 2)
    trainer.poison = Poison("zero")
    seen = []
    lock = trainer.weights.lock

    def on_step(info):
        assert not lock.locked()  # gossip may take the weights now: they are poison
        seen.append(float(trainer.weights.flat.abs().sum()))

    trainer.run(threading.Event(), on_step)
    assert seen == [0.0] * 4
    trainer.poison = None
    trainer.total_steps = 6
    trainer.run(threading.Event(), lambda info: seen.append(float(trainer.weights.flat.norm())))
    assert seen[-1] > 0  # cured: it trains again (from zero weights)
