"""Whole-command wall time: `gossip-train local --peers 2` against one process, same work.

Both train the seed MLP on MNIST for 5 epochs' worth of samples: one process
(`gossip-train peer --epochs 5`, its default torch threads: all cores) over all 60k, the
swarm (`gossip-train local --peers 2 --epochs 5`, one thread per peer) each peer over its
half. Time runs from before the command starts until it exits, so it includes imports, the
zygote, joining, lingering, evaluation, the final models and the consensus. Runs are
paired (one process, then the swarm, rep by rep) so each ratio compares the same load.
Also reported: each peer's linger (its ``lingered`` event) and the swarm's accuracy.

    .venv/bin/python benchmarks/wall_time.py --reps 5 [--data-dir ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_MNIST,
    REPO,
    command_line,
    emit,
    machine_info,
    markdown_table,
    median,
)


def timed(argv: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return wall, proc


def one_process(data: list[str], epochs: float, work: Path) -> dict[str, Any]:
    run_dir = work / f"one-{time.time_ns()}"
    argv = [sys.executable, "-m", "trainer.cli", "peer", "--epochs", str(epochs),
            "--run-dir", str(run_dir), *data]  # fmt: skip
    wall, proc = timed(argv, 1800)
    shown = proc.stdout.strip().splitlines()[-1]
    acc = float(shown.split("accuracy ")[1].split(",")[0]) if "accuracy " in shown else None
    return {"wall_s": round(wall, 2), "accuracy": acc}


def swarm(data: list[str], epochs: float, work: Path) -> dict[str, Any]:
    run_dir = work / f"swarm-{time.time_ns()}"
    argv = [sys.executable, "-m", "trainer.cli", "local", "--peers", "2", "--epochs", str(epochs),
            "--run-dir", str(run_dir), "--no-progress", *data]  # fmt: skip
    wall, _ = timed(argv, 1800)
    summary = json.loads((run_dir / "summary.json").read_text())
    lingers = []
    for p in summary["peers"]:
        lingers.append(p.get("linger_seconds"))
    return {
        "wall_s": round(wall, 2),
        "launcher_wall_s": summary["wall_seconds"],
        "linger_s": lingers,
        "peer_accuracy": [p.get("test_accuracy") for p in summary["peers"]],
        "consensus_accuracy": summary.get("consensus_test_accuracy"),
        "steps": [p["steps"] for p in summary["peers"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=5.0)
    ap.add_argument("--data-dir", default=str(DEFAULT_MNIST))
    ap.add_argument("--quick", action="store_true", help="bundled subset, 1 epoch, 1 rep")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        data, args.epochs, args.reps = [], 1.0, 1
    else:
        if not Path(args.data_dir).is_dir():
            raise SystemExit(f"--data-dir {args.data_dir}: no such folder")
        data = ["--dataset", "mnist", "--data-dir", args.data_dir]
    info = machine_info()
    reps = []
    with tempfile.TemporaryDirectory(prefix="gt-wall-") as tmp:
        work = Path(tmp)
        for i in range(args.reps):
            load = os.getloadavg()[0]
            one = one_process(data, args.epochs, work)
            two = swarm(data, args.epochs, work)
            reps.append({"rep": i, "load_1min": round(load, 2), "one": one, "swarm": two,
                         "ratio": round(two["wall_s"] / one["wall_s"], 3)})  # fmt: skip
            line = f"rep {i}: one {one['wall_s']} s, swarm {two['wall_s']} s"
            print(f"{line}, ratio {reps[-1]['ratio']}, linger {two['linger_s']}", file=sys.stderr)
    ratios = [r["ratio"] for r in reps]
    result = {
        "command": command_line(),
        "machine": info,
        "epochs": args.epochs,
        "reps": reps,
        "median_ratio": median(ratios),
        "median_one_s": median([r["one"]["wall_s"] for r in reps]),
        "median_swarm_s": median([r["swarm"]["wall_s"] for r in reps]),
        "max_linger_s": max(max(x or 0 for x in r["swarm"]["linger_s"]) for r in reps),
    }
    rows = [
        [r["rep"], r["one"]["wall_s"], r["swarm"]["wall_s"], r["ratio"],
         ", ".join(f"{x:.2f}" for x in r["swarm"]["linger_s"] if x is not None),
         r["one"]["accuracy"], r["swarm"]["consensus_accuracy"], r["load_1min"]]
        for r in reps
    ]  # fmt: skip
    table = markdown_table(
        ["rep", "one process (s)", "2 peers (s)", "ratio", "linger per peer (s)",
         "one-process accuracy", "consensus accuracy", "load at start"],
        rows,
    )  # fmt: skip
    emit(result, [table], args.json)


if __name__ == "__main__":
    main()
