"""Infrequent averaging with an outer optimizer: DiLoCo's rounds, gossiped pairwise.

DiLoCo (Douillard et al. 2023) runs H inner steps from the outer weights ``x``, takes the
pseudo-gradient ``g = x - theta`` (how far the inner steps went, sign flipped), all-reduces
it, and applies an outer Nesterov step to ``x``. There is no all-reduce here. Instead:

- Each peer keeps its own outer weights ``x_i`` (a copy of the model) and outer momentum.
- **Gossip averages the outer weights**, not the live ones: an exchange sends ``x_i``, and
  the pairwise delta ``d = (x_j - x_i) / 2`` is added to ``x_i`` *and* to the live weights
  ``theta_i`` (``OuterStore.push_delta``). Shifting both by the same ``d`` leaves the
  pseudo-gradient ``x_i - theta_i`` unchanged, so an exchange a neighbour starts in the
  middle of our H inner steps neither disturbs them nor corrupts our next outer step:
  exchanges stay asynchronous, as in plain gossip (no round barrier).
- **Every H steps** (``OuterStore.step``): ``g = x - theta``; ``m = mu m + g``;
  ``x -= lr (g + mu m)`` (Nesterov); ``theta = x``; then one exchange is offered.

Why this converges with pairwise (not global) averaging: pairwise gossip on ``x`` is a
doubly stochastic mixing that contracts the peers' outer weights toward their mean
(conserving the mean exactly); each outer step moves ``x_i`` by its own peer's progress.
With ``lr = 1`` and no momentum it is plain gossip every H steps (local SGD with gossip);
``lr < 1`` keeps part of ``x_i``, and momentum accumulates the (averaged, via ``x``) outer
direction. What differs from DiLoCo: each peer's momentum sees its own pseudo-gradient, not
the swarm's mean; mixing ``x`` carries the others' progress into it one exchange at a time.

Memory: the outer weights and the momentum, two model copies (DiLoCo's outer state); the
outer step itself allocates nothing (the live weights are its scratch, overwritten anyway).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OuterConfig:
    # Inner steps between outer steps (H); 0: off (plain gossip of the live weights).
    steps: int = 0
    lr: float = 0.7
    momentum: float = 0.9  # Nesterov's (0: plain outer SGD)


class OuterStore:
    """A ``WeightStore`` (gossip.exchange) over the outer weights of ``inner``: exchanges
    read and mix ``array`` (the outer weights), and every delta mixed in is added to the
    live weights too. ``step()`` is the outer optimizer step."""

    def __init__(self, inner: Any, config: OuterConfig) -> None:
        if getattr(inner, "push_delta", None) is not None and getattr(inner, "_mirror", None):
            raise ValueError("infrequent averaging (--outer-steps) does not support GPU weights")
        self.inner = inner
        self.config = config
        self.schema: str = inner.schema
        self.nbytes: int = inner.nbytes
        self.lock: threading.Lock = inner.lock
        self.layout = getattr(inner, "layout", None)
        with self.lock:
            self.array = inner.array.copy()  # x: the outer weights
        self.momentum = np.zeros_like(self.array)
        self.outer_steps = 0
        self.last_pseudo_norm = 0.0

    def push_delta(self, delta: np.ndarray) -> None:
        """Called under the lock after ``array += delta``: shift the live weights too."""
        np.add(self.inner.array, delta, out=self.inner.array)

    def push_delta_chunk(self, start: int, end: int, delta: np.ndarray) -> None:
        """The same for values ``start:end`` (compressed exchanges mix chunk by chunk)."""
        self.inner.array[start:end] += delta

    def load(self, vector: np.ndarray) -> None:
        """Take a neighbour's (outer) weights as ours: outer and live alike (a catch-up)."""
        if vector.shape != self.array.shape:
            raise ValueError(f"weight vector of {vector.size} values, model has {self.array.size}")
        with self.lock:
            np.copyto(self.array, vector)
            np.copyto(self.inner.array, vector)

    def state(self) -> dict[str, Any]:
        """Copies of the outer state (for a checkpoint; call under ``lock``)."""
        return {
            "outer_steps": self.outer_steps,
            "weights": self.array.copy(),
            "momentum": self.momentum.copy(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume the outer state ``state()`` took: the outer weights, the momentum and the
        count of outer steps. Raises ValueError (one line) unless it fits this model."""
        if not isinstance(state, dict):
            raise ValueError(f"outer state is {type(state).__name__}, not a dict")
        count = state.get("outer_steps")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"outer step count {count!r} is not a count")
        arrays = {}
        for key in ("weights", "momentum"):
            try:
                value = np.asarray(state.get(key), dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise ValueError(f"outer {key} are not an array of numbers") from None
            if value.shape != self.array.shape:
                raise ValueError(
                    f"outer {key} hold {value.size} values, the model has {self.array.size}"
                )
            if not np.isfinite(np.dot(value, value)):
                raise ValueError(f"outer {key} are not finite")
            arrays[key] = value
        with self.lock:
            np.copyto(self.array, arrays["weights"])
            np.copyto(self.momentum, arrays["momentum"])
        self.outer_steps = count

    def step(self) -> None:
        """The outer step (call from the training thread, after an inner step)."""
        c = self.config
        x, m = self.array, self.momentum
        with self.lock:
            live = self.inner.array
            g = np.subtract(x, live, out=live)  # the pseudo-gradient, in the live buffer
            self.last_pseudo_norm = float(np.sqrt(np.dot(g, g)))
            if c.momentum:
                m *= np.float32(c.momentum)
                m += g
            g *= np.float32(c.lr)
            x -= g
            if c.momentum:  # Nesterov: x -= lr * (g + mu * m), the g part done above
                np.multiply(m, np.float32(c.lr * c.momentum), out=live)
                x -= live
            np.copyto(live, x)
        self.outer_steps += 1
