"""Tasks: what to train, as a Python file or a built-in name.

A task is a module with these functions (the contract users rely on; see docs/api.md)::

    def model() -> torch.nn.Module                                   # required
    def data(peer, peers) -> tuple[Dataset, Dataset | None]          # required
    def loss(model, batch) -> torch.Tensor                           # default: cross-entropy
    def optimizer(params) -> torch.optim.Optimizer                   # default: Adam(lr=--lr)
    def metrics(model, batches) -> dict[str, float]                  # default: accuracy, loss
    def scheduler(optimizer) -> LR scheduler                         # optional, stepped per step

A function may declare more keyword arguments with defaults. Those named after a run
setting (``seed``, ``partition``, ``lr``, ``batch_size``, ``data_dir``, ``dataset``,
``arch``, ``steps``, ``model`` for ``optimizer``) receive the setting when it is set, so
``def data(peer, peers, seed=0, partition="iid")`` follows ``--seed`` and ``--partition``.
A module-level ``DEFAULTS`` dict gives the task's own defaults for ``batch_size``, ``lr``,
``steps``, ``epochs`` and ``clip_grad``; flags override it.

Every value a task hands back is checked here, so a wrong type is one line naming the
function and what it returned, never a traceback from deep inside the loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .data import batch_size_of, eval_batches, to_device

BUILTIN = {
    "classifier": "trainer.tasks.classifier",
    "shakespeare": "trainer.tasks.shakespeare",
}
# Keys of a task's DEFAULTS dict.
DEFAULT_KEYS = ("batch_size", "lr", "steps", "epochs", "clip_grad")


class TaskError(ValueError):
    """A task file that cannot be used as given: one line naming the file and the problem."""


@dataclass
class Task:
    name: str  # built-in name, or the file's stem
    source: str  # built-in name, or the file's absolute path
    module: ModuleType
    defaults: dict[str, Any] = field(default_factory=dict)
    # The run settings a task function may ask for by name (trainer.loop.task_context).
    context: dict[str, Any] = field(default_factory=dict)

    # -- the contract, checked --------------------------------------------------------------
    def _fn(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, name, None)
        if fn is not None and not callable(fn):
            raise TaskError(f"task {self.source}: {name} is not a function")
        return fn

    def _call(self, name: str, *args: Any, **extra: Any) -> Any:
        fn = self._fn(name)
        assert fn is not None
        return call_with_context(fn, args, {**self.context, **extra})

    def build_model(self, seed: int) -> nn.Module:
        """``model()`` with weights from ``seed`` alone: every peer starts at the same point."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self._call("model")
        if not isinstance(net, nn.Module):
            raise TaskError(
                f"task {self.source}: model() returned {type(net).__name__}, not a torch.nn.Module"
            )
        if not any(True for _ in net.parameters()):
            raise TaskError(f"task {self.source}: model() has no parameters to train")
        return net

    def datasets(self, peer: int, peers: int) -> tuple[Any, Any | None]:
        out = self._call("data", peer, peers)
        where = f"task {self.source}: data({peer}, {peers})"
        if not isinstance(out, tuple) or len(out) != 2:
            raise TaskError(
                f"{where} returned {type(out).__name__}; it must return "
                "(train_dataset, eval_dataset or None)"
            )
        train, evaluation = out
        _check_dataset(train, f"{where}: the training set", allow_none=False)
        _check_dataset(evaluation, f"{where}: the evaluation set", allow_none=True)
        return train, evaluation

    def optimizer(self, model: nn.Module, params: list[nn.Parameter]) -> Any:
        if self._fn("optimizer") is None:
            lr = self.context.get("lr") or 1e-3
            return torch.optim.Adam(params, lr=lr)
        opt = self._call("optimizer", params, model=model)
        if not isinstance(opt, torch.optim.Optimizer) and not _quacks_like_optimizer(opt):
            raise TaskError(
                f"task {self.source}: optimizer() returned {type(opt).__name__}, "
                "not a torch.optim.Optimizer"
            )
        return opt

    def scheduler(self, optimizer: Any) -> Any | None:
        if self._fn("scheduler") is None:
            return None
        sched = self._call("scheduler", optimizer)
        if not (callable(getattr(sched, "step", None)) and hasattr(sched, "state_dict")):
            raise TaskError(
                f"task {self.source}: scheduler() returned {type(sched).__name__}, "
                "not an LR scheduler (needs step() and state_dict())"
            )
        return sched

    @property
    def has_loss(self) -> bool:
        return self._fn("loss") is not None

    def _scalar_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        fn = self._fn("loss")
        out = default_loss(model, batch) if fn is None else fn(model, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            what = type(out).__name__
            if isinstance(out, torch.Tensor):
                what = f"a tensor of shape {list(out.shape)}"
            raise TaskError(f"task {self.source}: loss() returned {what}, not a scalar tensor")
        return out

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        out = self._scalar_loss(model, batch)
        if not out.requires_grad:
            raise TaskError(
                f"task {self.source}: loss() returned a tensor that does not depend on the "
                "model's parameters (no gradient)"
            )
        return out.reshape(())

    def loss_value(self, model: nn.Module, batch: Any) -> float:
        """The task's loss of one batch as a number (evaluation: no gradient needed)."""
        return self._scalar_loss(model, batch).item()

    def evaluate(
        self, model: nn.Module, eval_set: Any, batch_size: int, device: torch.device | None = None
    ) -> dict[str, float]:
        """``metrics`` over the whole evaluation set, in eval mode under inference_mode (the
        model's mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                batches = eval_batches(eval_set, batch_size)
                if device is not None:
                    batches = (to_device(b, device) for b in batches)
                return self.metrics(model, batches)
        finally:
            model.train(was_training)

    def metrics(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        fn = self._fn("metrics")
        if fn is None:
            out = default_metrics(model, batches, self if self.has_loss else None)
        else:
            out = fn(model, batches)
        if not isinstance(out, Mapping) or not out:
            raise TaskError(
                f"task {self.source}: metrics() returned {type(out).__name__}; it must "
                "return a non-empty dict of name -> number"
            )
        clean: dict[str, float] = {}
        for key, value in out.items():
            try:
                clean[str(key)] = float(value)
            except (TypeError, ValueError):
                raise TaskError(
                    f"task {self.source}: metrics() value {key!r} is "
                    f"{type(value).__name__}, not a number"
                ) from None
        return clean


def call_with_context(fn: Callable[..., Any], args: tuple[Any, ...], ctx: Mapping[str, Any]) -> Any:
    """``fn(*args, **kw)`` with the settings from ``ctx`` that ``fn`` names (and are set)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args)
    params = list(sig.parameters.values())
    names = {
        p.name for p in params[len(args) :] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    kwargs = {k: v for k, v in ctx.items() if k in names and v is not None}
    return fn(*args, **kwargs)


def _quacks_like_optimizer(opt: Any) -> bool:
    return all(callable(getattr(opt, m, None)) for m in ("step", "zero_grad", "state_dict"))


def _check_dataset(ds: Any, where: str, *, allow_none: bool) -> None:
    if ds is None and allow_none:
        return
    if ds is None or not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise TaskError(
            f"{where} is {type(ds).__name__}, not a map-style Dataset "
            "(it needs __getitem__ and __len__)"
        )
    if len(ds) == 0:
        raise TaskError(f"{where} is empty")


# -- defaults for tasks that leave a function out -----------------------------------------------
def _xy(batch: Any, what: str) -> tuple[Any, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TaskError(
            f"the default {what} needs batches of (input, target); this task's batches are "
            f"{type(batch).__name__}: define {what}() in the task"
        )
    return batch[0], batch[1]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = _xy(batch, "loss")
    return nn.functional.cross_entropy(model(x), y)


def default_metrics(model: nn.Module, batches: Iterable[Any], task: Task | None) -> dict:
    """Accuracy and mean cross-entropy; with a task's own loss, the mean of that loss."""
    total = correct = 0
    loss_sum = 0.0
    for batch in batches:
        if task is not None:
            n = batch_size_of(batch)
            loss_sum += task.loss_value(model, batch) * n
            total += n
            continue
        x, y = _xy(batch, "metrics")
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise TaskError("the evaluation set gave no batches")
    if task is not None:
        return {"loss": loss_sum / total}
    return {"accuracy": correct / total, "loss": loss_sum / total}


# -- loading ----------------------------------------------------------------------------------
def load_task(spec: str, context: Mapping[str, Any] | None = None) -> Task:
    """A built-in task by name, or a task file by path; checked for the required functions."""
    if spec in BUILTIN:
        module = importlib.import_module(BUILTIN[spec])
        name, source = spec, spec
    else:
        path = Path(spec)
        if not path.suffix == ".py" and not path.exists():
            raise TaskError(
                f"task {spec!r}: no such file and not a built-in task "
                f"(built-in: {', '.join(BUILTIN)})"
            )
        module = _import_file(path)
        name, source = path.stem, str(path.resolve())
    for required in ("model", "data"):
        if not callable(getattr(module, required, None)):
            raise TaskError(f"task {source}: defines no {required}() function")
    defaults = getattr(module, "DEFAULTS", {}) or {}
    if not isinstance(defaults, Mapping):
        raise TaskError(f"task {source}: DEFAULTS must be a dict")
    unknown = set(defaults) - set(DEFAULT_KEYS)
    if unknown:
        raise TaskError(
            f"task {source}: DEFAULTS has unknown key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(DEFAULT_KEYS)})"
        )
    return Task(name, source, module, dict(defaults), dict(context or {}))


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TaskError(f"task {path}: no such file")
    resolved = path.resolve()
    # One module per file and process: the zygote imports it before forking peers, and a
    # DataLoader's worker processes find it again under the same name.
    mod_name = "gossip_task_" + "".join(c if c.isalnum() else "_" for c in str(resolved))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise TaskError(f"task {path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[mod_name]
        raise TaskError(f"task {path}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        del sys.modules[mod_name]
        raise TaskError(f"task {path}: import failed: {type(exc).__name__}: {exc}") from exc
    return module
