"""The outer state a checkpoint keeps (gossip.outer.OuterStore.state / load_state)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gossip.outer import OuterConfig, OuterStore


class _Live:
    schema = "s"

    def __init__(self, n: int) -> None:
        self.array = np.arange(n, dtype=np.float32)
        self.nbytes = self.array.nbytes
        self.lock = threading.Lock()


def test_the_outer_state_round_trips_and_is_a_copy() -> None:
    a = OuterStore(_Live(8), OuterConfig(steps=4))
    a.inner.array -= 1.0
    a.step()
    saved = a.state()
    a.step()  # later steps do not reach what was saved
    b = OuterStore(_Live(8), OuterConfig(steps=4))
    b.load_state(saved)
    assert b.outer_steps == 1
    assert not np.array_equal(b.array, a.array)
    c = OuterStore(_Live(8), OuterConfig(steps=4))
    c.inner.array -= 1.0
    c.step()
    np.testing.assert_array_equal(b.array, c.array)
    np.testing.assert_array_equal(b.momentum, c.momentum)


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ([], "not a dict"),
        ({"outer_steps": -1}, "not a count"),
        ({"outer_steps": True}, "not a count"),
        ({"outer_steps": 2, "weights": np.zeros(7), "momentum": np.zeros(8)}, "7 values"),
        ({"outer_steps": 2, "weights": np.zeros(8), "momentum": None}, "momentum"),
        ({"outer_steps": 2, "weights": "abc", "momentum": np.zeros(8)}, "not an array"),
        ({"outer_steps": 2, "weights": np.full(8, np.nan), "momentum": np.zeros(8)}, "finite"),
    ],
)
def test_an_outer_state_that_does_not_fit_is_refused_and_nothing_moves(state, needle) -> None:
    a = OuterStore(_Live(8), OuterConfig(steps=4))
    before = a.array.copy()
    with pytest.raises(ValueError, match=needle):
        a.load_state(state)
    np.testing.assert_array_equal(a.array, before)
    assert a.outer_steps == 0
