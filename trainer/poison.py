"""Poisoned weights, for the chaos tool's ``poison`` fault: a peer that plays a hostile member.

A member that holds the cluster secret can send any weights it likes. Under ``gossip-train
chaos`` (``kind=poison peer=P mode=...``, a CONTROL ``{"op": "poison", "mode": ...}``) a
peer's trainer rewrites its own weights after every training step, under the weights lock,
so every snapshot it sends in an exchange is the poison; its exchanger meanwhile mixes
nothing in (``Exchanger.apply_received``), as a hostile member would not.

| mode | the weights after each step | default factor |
| --- | --- | --- |
| ``zero`` | all zeros | - |
| ``negate`` | ``-w``, ``w`` the weights its optimizer's updates alone would give | - |
| ``scale`` | ``w`` scaled to ``factor`` times the norm they had when the poison began | 10 |
| ``noise`` | ``w + N(0, s^2)``, ``s = factor * rms(w)``, fresh noise each step | 10 |

None of them compounds step after step: negating the weights again at every step would
flip them back every other step (half the exchanges would send nearly honest weights), so
``negate`` keeps ``w`` as the start plus every update since and sends ``-w``; ``scale`` pins
the norm rather than multiplying again (which would overflow within a few dozen steps);
``noise`` takes the previous step's noise out before it adds the next, so the weights
underneath do not drift as a random walk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where the weights are touched: the chaos tool's
    import torch  # scenario parser reads MODES and check() without it

MODES = ("zero", "negate", "scale", "noise")
DEFAULT_FACTOR = {"scale": 10.0, "noise": 10.0}


def check(mode: str, factor: Any) -> str | None:
    """Why ``mode`` and ``factor`` do not make a poison (None: they do)."""
    if mode not in MODES:
        return f"unknown poison mode {mode!r} (one of: {', '.join(MODES)})"
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, int | float):
        return f"factor must be a number, not {factor!r}"
    if not math.isfinite(factor) or factor <= 0 or factor > 1e6:
        return f"factor must be positive and at most 1e6, not {factor}"
    if mode in ("zero", "negate"):
        return f"mode {mode} takes no factor"
    return None


@dataclass
class Poison:
    mode: str
    factor: float | None = None
    _norm: float | None = field(default=None, repr=False)  # scale: the norm at the start
    _noise: torch.Tensor | None = field(default=None, repr=False)  # noise: last step's
    _sent: torch.Tensor | None = field(default=None, repr=False)  # negate: the last -w
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        why = check(self.mode, self.factor)
        if why is not None:
            raise ValueError(why)
        if self.factor is None:
            self.factor = DEFAULT_FACTOR.get(self.mode)

    def apply(self, flat: torch.Tensor) -> None:
        """Poison the flat weight vector in place. Call under the weights lock."""
        import torch

        with torch.no_grad():
            self._apply(flat)

    def _apply(self, flat: torch.Tensor) -> None:
        if self.mode == "zero":
            flat.zero_()
        elif self.mode == "negate":
            # flat = -w_prev + u (this step's update); w = w_prev + u, so -w = 2 (-w_prev) - flat
            if self._sent is None:
                self._sent = flat.neg()
            else:
                self._sent.mul_(2).sub_(flat)
            flat.copy_(self._sent)
        elif self.mode == "scale":
            assert self.factor is not None
            norm = float(flat.norm())
            if self._norm is None:
                self._norm = norm
            if norm > 0:
                flat.mul_(self.factor * self._norm / norm)
        else:
            self._add_noise(flat)

    def _add_noise(self, flat: torch.Tensor) -> None:
        import torch

        assert self.factor is not None
        if self._noise is not None:
            flat.sub_(self._noise)  # the weights underneath, as the last step left them
        if self._gen is None:
            self._gen = torch.Generator(device=flat.device).manual_seed(0)
        rms = float(flat.norm()) / math.sqrt(max(1, flat.numel()))
        noise = torch.randn(flat.shape, generator=self._gen, device=flat.device, dtype=flat.dtype)
        noise.mul_(self.factor * rms)
        flat.add_(noise)
        self._noise = noise
