"""Evaluate saved models, and build the final consensus model of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_any, model_state, save_atomic
from .data import Dataset, load_dataset
from .models import build_model, evaluate


def _meta_for(path: Path) -> dict[str, Any]:
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def evaluate_file(
    path: str, dataset: str | None, data_dir: str | None, model: str | None
) -> tuple[float, dict[str, Any]]:
    """Accuracy of a final model (state_dict) or a checkpoint on a data set's test split."""
    p = Path(path)
    loaded = load_any(p)
    config = loaded.get("config", {}) if "format" in loaded else {}
    meta = {**_meta_for(p), **(config if isinstance(config, dict) else {})}
    dataset = dataset or meta.get("dataset") or "default"
    model = model or meta.get("model") or "mlp"
    data = load_dataset(
        dataset,
        Path(data_dir)
        if data_dir
        else (Path(meta["data_dir"]) if meta.get("data_dir") and dataset != "default" else None),
    )
    net = build_model(model, data.input_shape, data.num_classes)
    state = model_state(loaded)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{p}: does not fit model {model!r}: {first[-1].strip()}") from None
    acc = evaluate(net, data.x_test, data.y_test)
    return acc, {"dataset": dataset, "model": model, "test_samples": len(data.y_test)}


def consensus(
    finals: list[tuple[Path, int]], model_name: str, data: Dataset, out: Path, meta: dict[str, Any]
) -> float:
    """Sample-weighted average of the peers' final weights; save it and return its accuracy."""
    total = sum(n for _, n in finals)
    avg: dict[str, torch.Tensor] = {}
    for path, n in finals:
        state = model_state(load_any(path))
        for k, v in state.items():
            w = v.to(torch.float64) * (n / total)
            avg[k] = avg[k] + w if k in avg else w
    net = build_model(model_name, data.input_shape, data.num_classes)
    ref = net.state_dict()
    state = {k: avg[k].to(ref[k].dtype) for k in ref}
    net.load_state_dict(state)
    acc = evaluate(net, data.x_test, data.y_test)
    save_atomic(state, out)
    out.with_suffix(".json").write_text(json.dumps({**meta, "test_accuracy": acc}, indent=2))
    return acc
