"""The GPU path: weights on the device, gossip through a pinned host mirror.

These run only where CUDA is available (the project's CI machine has no GPU); the same
code path's CPU twin is covered everywhere else.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli

from trainer.weights import FlatWeights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mirror_reads_and_writes_the_device_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).cuda()
    weights = FlatWeights(model)
    assert weights.flat.is_cuda and not torch.from_numpy(weights.array).is_cuda
    model(torch.randn(16, 8, device="cuda")).sum().backward()  # queued on the device
    with weights.lock:
        weights.refresh_host()
        host = weights.array.copy()
    assert np.array_equal(host, weights.flat.cpu().numpy())
    delta = np.full_like(host, 0.5)
    with weights.lock:
        np.add(weights.array, delta, weights.array)
        weights.push_delta(delta)
    torch.cuda.synchronize()
    assert np.allclose(weights.flat.cpu().numpy(), host + 0.5)
    weights.load(np.zeros_like(host))
    torch.cuda.synchronize()
    assert torch.count_nonzero(model[0].weight) == 0


def test_two_peers_on_the_gpu_train_and_agree(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "local",
            "--peers",
            "2",
            "--device",
            "cuda",
            "--steps",
            "300",
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ),  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    peers = summary["peers"]
    assert [p["status"] for p in peers] == ["finished", "finished"]
    assert all(p["exchanges"] > 0 and p["metrics"]["accuracy"] > 0.85 for p in peers)
    a, b = (torch.load(p["final_model"], weights_only=True) for p in peers)
    for key in a:
        assert not a[key].is_cuda  # final models are CPU state_dicts
        assert torch.allclose(a[key], b[key], atol=1e-3), key
