"""Adam over one flat parameter vector: the same update as ``torch.optim.Adam``, in six ops.

``FlatWeights`` already makes every parameter a view into one contiguous tensor. This
optimizer does the same for the gradients and the two moments, so a step is six vectorised
passes over the whole model instead of six per tensor, and nothing is allocated per step
(``zero_grad`` zeroes the flat gradient in place; backward accumulates into its views).

It also starts faster. Every ``torch.optim.Optimizer`` wraps ``step``, ``zero_grad`` and
the state-dict methods in ``torch._disable_dynamo``, which imports ``torch._dynamo`` (about
800 modules, 1.4 s of CPU and 67 MB) on the first call. A peer that builds this optimizer
never imports it.

The update is ``torch.optim.Adam``'s single-tensor path with its defaults (no weight decay,
no amsgrad), element for element, for models whose every parameter gets a gradient each
step (all of ``trainer.models``; ``torch.optim.Adam`` skips a parameter without one, this
updates it from its moments), and ``state_dict()`` has ``torch.optim.Adam``'s layout,
so checkpoints of either load into the other (tests/test_optim.py checks both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .weights import FlatWeights


def flat_view(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one tensor ``params`` are consecutive views of (as ``FlatWeights`` lays them out).

    ValueError if they are not laid out that way: FlatAdam then cannot work on them.
    """
    if not params:
        raise ValueError("FlatAdam: no parameters")
    first = params[0]
    storage, start, offset = first.untyped_storage(), first.storage_offset(), 0
    for p in params:
        laid_out = (
            p.untyped_storage().data_ptr() == storage.data_ptr()
            and p.storage_offset() == start + offset
            and p.is_contiguous()
            and p.dtype == first.dtype
        )
        if not laid_out:
            raise ValueError(
                "FlatAdam needs parameters laid out in one flat vector (trainer.weights."
                "FlatWeights does that); use torch.optim.Adam for these"
            )
        offset += p.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(storage, start, (offset,), (1,))


class FlatAdam:
    def __init__(
        self,
        params: FlatWeights | Sequence[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.params = list(params.params if isinstance(params, FlatWeights) else params)
        self.flat = flat_view(self.params)
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self._denom = torch.empty_like(self.flat)
        self.steps = 0
        self._grad_views = self._views(self.grad)
        for p, g in zip(self.params, self._grad_views, strict=True):
            p.grad = g  # backward accumulates into these views in place

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            n = p.numel()
            out.append(flat[offset : offset + n].view_as(p))
            offset += n
        return out

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.grad.zero_()  # never None: backward accumulates into the flat gradient's views

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        step = float(self.steps)
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        torch.sqrt(self.exp_avg_sq, out=self._denom)
        self._denom.div_(bias_correction2_sqrt).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, self._denom, value=-step_size)

    # -- torch.optim.Adam's state-dict layout ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Views of the live state, laid out as ``torch.optim.Adam.state_dict()``; copy it."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        if self.steps:
            moments = zip(self._views(self.exp_avg), self._views(self.exp_avg_sq), strict=True)
            for i, (m, v) in enumerate(moments):
                # One step tensor each: torch.optim.Adam increments them in place.
                step = torch.tensor(float(self.steps))
                state[i] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
        group = {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": 0,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
            "params": list(range(len(self.params))),
        }
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` over the same model."""
        groups, state = sd.get("param_groups"), sd.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state, dict):
            raise ValueError("expected one Adam parameter group")
        group = groups[0]
        n = len(self.params)
        if list(group.get("params", ())) != list(range(n)):
            raise ValueError(f"state has {len(group.get('params', ()))} parameters, model {n}")
        for key, ours in (("weight_decay", 0), ("amsgrad", False), ("maximize", False)):
            if group.get(key, ours) != ours:
                raise ValueError(f"Adam with {key}={group[key]!r} is not supported")
        steps = 0
        if state:
            if sorted(state) != list(range(n)):
                raise ValueError(f"state for {len(state)} parameters, model has {n}")
            stepped = {float(s["step"]) for s in state.values()}
            if len(stepped) != 1:
                raise ValueError("parameters at different step counts")
            steps = int(stepped.pop())
            for i, p in enumerate(self.params):
                for name in ("exp_avg", "exp_avg_sq"):
                    src = state[i][name]
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{name} of parameter {i} is {list(src.shape)}, "
                            f"the model's is {list(p.shape)}"
                        )
        with torch.no_grad():
            if steps:
                for i, (m, v) in enumerate(
                    zip(self._views(self.exp_avg), self._views(self.exp_avg_sq), strict=True)
                ):
                    m.copy_(state[i]["exp_avg"])
                    v.copy_(state[i]["exp_avg_sq"])
            else:
                self.exp_avg.zero_()
                self.exp_avg_sq.zero_()
        self.steps = steps
        self.lr = float(group.get("lr", self.lr))
        betas = group.get("betas", self.betas)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(group.get("eps", self.eps))
