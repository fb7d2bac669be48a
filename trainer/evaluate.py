"""Evaluate saved models, and build the final consensus model of a run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_any, model_state, save_atomic
from .config import TrainConfig
from .task import Task, TaskError


def _meta_for(path: Path) -> dict[str, Any]:
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def load_into(task: Task, state: Mapping[str, torch.Tensor], seed: int, source: str) -> Any:
    """The task's model with ``state`` loaded strictly; one line naming the misfit if not."""
    net = task.build_model(seed)
    ref = net.state_dict()
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model has not"
        raise TaskError(f"{source}: not a model of task {task.name!r} (it {what})")
    for key, want in ref.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise TaskError(
                f"{source}: not a model of task {task.name!r} ({key} is {list(got.shape)} "
                f"{got.dtype}, the model's is {list(want.shape)} {want.dtype})"
            )
    net.load_state_dict(state, strict=True)
    return net


def evaluate_file(
    path: str, task_spec: str | None, dataset: str | None, data_dir: str | None, model: str | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """A task's metrics of a final model (state_dict) or a checkpoint, on its evaluation set.

    What the file does not say (task, data set, model) comes from the checkpoint's config or
    the ``.json`` written beside a consensus model; flags override both.
    """
    from .loop import load_task_for

    p = Path(path)
    loaded = load_any(p)
    config = loaded.get("config", {}) if "format" in loaded else {}
    meta = {**_meta_for(p), **(config if isinstance(config, dict) else {})}
    if task_spec is None:
        task_spec = meta.get("task_source") or meta.get("task") or "classifier"
    saved_dir = meta.get("data_dir") if meta.get("dataset") not in (None, "default") else None
    cfg = TrainConfig(
        task=str(task_spec),
        dataset=dataset or meta.get("dataset") or "default",
        data_dir=data_dir or saved_dir,
        model=model or meta.get("model") or "mlp",
        seed=int(meta.get("seed", 0) or 0),
    )
    task = load_task_for(cfg)
    if meta.get("task") and meta["task"] != task.name:
        raise TaskError(f"{p}: was written by task {meta['task']!r}, not {task.name!r}")
    net = load_into(task, model_state(loaded), cfg.seed, str(p))
    _, eval_set = task.datasets(0, int(meta.get("num_peers", 1) or 1))
    if eval_set is None:
        raise TaskError(f"task {task.name}: data() gives no evaluation set to evaluate on")
    metrics = task.evaluate(net, eval_set, cfg.eval_batch_size)
    return metrics, {"task": task.name, "eval_samples": len(eval_set)}


def average_states(finals: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """Weighted average of saved state_dicts: floating tensors averaged (in float64, weights
    normalized), every other tensor (integer buffers) taken from the first."""
    total = sum(w for _, w in finals) or 1.0
    avg: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for i, (path, weight) in enumerate(finals):
        state = model_state(load_any(path))
        if i == 0:
            first = state
        elif state.keys() != first.keys():
            raise TaskError(f"{path}: its tensors differ from {finals[0][0]}'s")
        for k, v in state.items():
            if v.is_floating_point():
                w = v.to(torch.float64) * (weight / total)
                avg[k] = avg[k] + w if k in avg else w
    return {k: (avg[k].to(v.dtype) if k in avg else v.clone()) for k, v in first.items()}


def consensus(
    finals: list[tuple[Path, float]],
    out: Path,
    meta: dict[str, Any],
    cfg: TrainConfig | None = None,
    num_peers: int = 1,
) -> dict[str, float] | None:
    """Average the peers' final models into ``out`` (a plain state_dict); with the run's
    TrainConfig, evaluate it on the task's evaluation set and return the metrics."""
    from .loop import load_task_for

    state = average_states(finals)
    metrics = None
    if cfg is not None:
        task = load_task_for(cfg)
        net = load_into(task, state, cfg.seed, str(out))
        _, eval_set = task.datasets(0, num_peers)
        if eval_set is not None:
            metrics = task.evaluate(net, eval_set, cfg.eval_batch_size)
        meta = {**meta, "task": task.name, "task_source": task.source}
    save_atomic(state, out)
    extra: dict[str, Any] = {"metrics": metrics}
    if metrics and "accuracy" in metrics:
        extra["test_accuracy"] = metrics["accuracy"]
    out.with_suffix(".json").write_text(json.dumps({**meta, **extra}, indent=2))
    return metrics


def run_config(args: Any) -> TrainConfig:
    """The TrainConfig a launcher's peers run with (flags over the defaults)."""
    from .flags import train_overrides

    return dataclasses.replace(TrainConfig(), **train_overrides(args))
