"""The baselines' workers stop at a time budget with the evaluation that says how far they got
(``--max-seconds``: slowlink's DDP runs over capped links, which cannot reach the target in
any budget this machine has)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("worker", ["_lm_worker.py", "_ddp_worker.py"])
def test_a_worker_stops_at_its_time_budget_with_an_evaluation(worker: str, mnist_dir: Path) -> None:
    # The budget is spent before the first step ends: rank 0 stops after it, between two
    # evaluation points, and evaluates once.
    job = {
        "_lm_worker.py": ["--eval-every", "100", "--max-steps", "3000"],
        "_ddp_worker.py": ["--data", str(mnist_dir), "--max-epochs", "12", "--target", "0.999"],
    }[worker]
    cmd = [str(BENCH / worker), "--job", "tta", "--launch", repr(time.time()), *job]
    proc = subprocess.run(
        [sys.executable, *cmd, "--max-seconds", "0.001"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line.removeprefix("RESULT "))
    assert r["steps"] == 1 and r["reached"] is None
    [(at, seconds, metric)] = r["curve"]  # [step or epochs, s since launch, metric]
    assert seconds > 0
    if worker == "_lm_worker.py":
        assert at == 1 and metric > 1.9  # val_loss, far from the target after one step
    else:
        assert 0 < at < 0.01 and 0 <= metric < 0.999  # accuracy after one step of an epoch
