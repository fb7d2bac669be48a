"""The baselines' workers stop at a time budget with the evaluation that says how far they got
(``--max-seconds``: slowlink's DDP runs over capped links, which cannot reach the target in
any budget this machine has)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _result(cmd: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, *cmd], cwd=BENCH.parent, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def test_the_transformer_worker_stops_at_its_time_budget_with_an_evaluation() -> None:
    launch = time.time()
    # The budget is spent before the first step ends: rank 0 stops after it, between two
    # --eval-every points, and evaluates once.
    r = _result(
        [
            str(BENCH / "_lm_worker.py"),
            *("--job", "tta", "--launch", repr(launch), "--max-seconds", "0.001"),
            *("--eval-every", "100", "--max-steps", "3000"),
        ]
    )
    assert r["steps"] == 1
    assert r["reached"] is None
    [(step, seconds, val_loss)] = r["curve"]
    assert step == 1 and seconds > 0 and val_loss > 1.9


def test_the_mnist_worker_stops_at_its_time_budget_with_an_evaluation(mnist_dir: Path) -> None:
    launch = time.time()
    r = _result(
        [
            str(BENCH / "_ddp_worker.py"),
            *("--job", "tta", "--launch", repr(launch), "--data", str(mnist_dir)),
            *("--max-seconds", "0.001", "--max-epochs", "12", "--target", "0.999"),
        ]
    )
    assert r["steps"] == 1
    assert r["reached"] is None
    [(epochs, seconds, accuracy)] = r["curve"]
    assert 0 < epochs < 0.01 and seconds > 0 and 0 <= accuracy < 0.999
