"""Training baselines for gossip to beat: one plain process and torch DDP (gloo) on MNIST.

- time to accuracy: the seed MLP (784-128 ReLU-10), batch 32 per worker, Adam 1e-3, until
  97.5% test accuracy (rank 0 evaluates every 0.25 epoch) or ``max_epochs``; one plain
  process, then DDP with 2 and 4 workers, each on its own DistributedSampler-like shard.
  Time is wall time from just before the first process is started to the evaluation that
  reached the target, so start-up (imports, data loading, rendezvous) is included;
- straggler: 4 DDP workers for a fixed number of steps, then again with rank 3 slowed to a
  quarter of its speed (it sleeps 3x its own compute time after each step); the other
  ranks' steps/s in both runs.

Every worker runs with one torch thread (a 2-core machine: 4 workers already oversubscribe
it). Workers are ``benchmarks/_ddp_worker.py`` processes.

    .venv/bin/python benchmarks/baselines.py            # full: about 3 minutes on 2 cores
    .venv/bin/python benchmarks/baselines.py --quick    # smoke run on a data subset
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from common import (
    BASELINE_QUICK,
    BENCH_DIR,
    DEFAULT_MNIST,
    BaselineConfig,
    command_line,
    emit,
    machine_info,
    markdown_table,
    python_cmd,
    require_result,
    run_ranks,
)

log = logging.getLogger(__name__)


def launch(world: int, job: list[str], cfg: BaselineConfig) -> tuple[float, list[dict[str, Any]]]:
    """Start ``world`` workers; return the launcher's time.time() and every rank's result."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        common_args = [
            "--world", str(world), "--init", f"file://{Path(tmp) / 'rendezvous'}",
            "--data", cfg.data, "--subset", str(cfg.subset), *job,
        ]  # fmt: skip
        launched = time.time()
        worker = [*python_cmd(), str(BENCH_DIR / "_ddp_worker.py")]
        cmds = [
            [*worker, "--rank", str(rank), "--launch", repr(launched), *common_args]
            for rank in range(world)
        ]
        results = run_ranks(cmds, env, launched + cfg.timeout, _result)
    return launched, results


def _result(out: str, rank: int) -> dict[str, Any]:
    return require_result(out, f"worker {rank}")


# -- time to accuracy ------------------------------------------------------------------------
def time_to_accuracy(world: int, cfg: BaselineConfig) -> dict[str, Any]:
    job = [
        "--job", "tta", "--target", str(cfg.target), "--max-epochs", str(cfg.max_epochs),
        "--eval-every", str(cfg.eval_every),
    ]  # fmt: skip
    launched, results = launch(world, job, cfg)
    wall = time.time() - launched
    r0 = results[0]
    reached = r0["reached"]
    train_s = r0["end_s"] - r0["startup_s"]
    return {
        "name": "single process" if world == 1 else f"DDP gloo x{world}",
        "workers": world,
        "reached": reached is not None,
        "time_to_target_s": reached[1] if reached else None,
        "epochs_to_target": reached[0] if reached else None,
        "final_accuracy": r0["curve"][-1][2] if r0["curve"] else None,
        "startup_s": r0["startup_s"],
        "steps_per_worker": r0["steps"],
        "steps_per_s_per_worker": r0["steps"] / train_s if train_s > 0 else None,
        "eval_s_rank0": r0["eval_s"],
        "trained_s": r0["end_s"],
        "closed_s": r0["closed_s"],
        "wall_s": wall,
        "curve": r0["curve"],
    }


def tta_table(rows: list[dict[str, Any]], target: float) -> str:
    def opt(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return markdown_table(
        [
            "run",
            f"time to {target:.1%} (s)",
            "epochs",
            "start-up (s)",
            "steps/s per worker",
            "last accuracy",
            "wall (s)",
        ],
        [
            [
                r["name"],
                opt(r["time_to_target_s"], ".1f") if r["reached"] else "not reached",
                opt(r["epochs_to_target"], ".2f"),
                opt(r["startup_s"], ".1f"),
                opt(r["steps_per_s_per_worker"], ".0f"),
                opt(r["final_accuracy"], ".4f"),
                opt(r["wall_s"], ".1f"),
            ]
            for r in rows
        ],
    )


# -- straggler ---------------------------------------------------------------------------------
def throughput(world: int, straggler: int, cfg: BaselineConfig) -> dict[str, Any]:
    job = [
        "--job", "throughput", "--steps", str(cfg.steps),
        "--warmup-steps", str(cfg.warmup_steps), "--straggler", str(straggler),
        "--slowdown", str(cfg.slowdown),
    ]  # fmt: skip
    _, results = launch(world, job, cfg)
    others = [r["steps_per_s"] for r in results if not r["straggler"]]
    return {
        "straggler_rank": straggler if straggler >= 0 else None,
        "per_rank": results,
        "others_steps_per_s": statistics.mean(others),
    }


def straggler(cfg: BaselineConfig, world: int = 4) -> dict[str, Any]:
    base = throughput(world, -1, cfg)
    slow = throughput(world, world - 1, cfg)
    # The straggler's own speed alone: compute per step, and with the sleep.
    s = next(r for r in slow["per_rank"] if r["straggler"])
    return {
        "workers": world,
        "slowdown": cfg.slowdown,
        "no_straggler": base,
        "with_straggler": slow,
        "others_ratio": slow["others_steps_per_s"] / base["others_steps_per_s"],
        "straggler_compute_ms_per_step": 1e3 * s["compute_cpu_s"] / s["steps"],
        "straggler_sleep_ms_per_step": 1e3 * s["slept_s"] / s["steps"],
    }


def straggler_table(r: dict[str, Any]) -> str:
    base = r["no_straggler"]["others_steps_per_s"]
    slow = r["with_straggler"]["others_steps_per_s"]
    return markdown_table(
        ["run", "others' steps/s (mean per rank)", "vs no straggler"],
        [
            [f"DDP gloo x{r['workers']}, no straggler", f"{base:.1f}", "100%"],
            [
                f"DDP gloo x{r['workers']}, rank {r['workers'] - 1} at 1/{1 + r['slowdown']:g} "
                "speed",
                f"{slow:.1f}",
                f"{r['others_ratio']:.0%}",
            ],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--data", default="", help=f"MNIST folder (default {DEFAULT_MNIST})")
    parser.add_argument("--only", choices=("tta", "straggler"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    cfg = BASELINE_QUICK if args.quick else BaselineConfig()
    if args.data:
        cfg = replace(cfg, data=args.data)
    out: dict[str, Any] = {
        "benchmark": "baselines",
        "command": command_line(),
        "machine": machine_info(),
        "config": asdict(cfg),
    }
    tables = []
    if args.only in (None, "tta"):
        rows = []
        for world in cfg.worlds:
            log.info("time to accuracy, %d worker(s)", world)
            rows.append(time_to_accuracy(world, cfg))
        out["time_to_accuracy"] = rows
        tables.append(tta_table(rows, cfg.target))
    if args.only in (None, "straggler"):
        log.info("straggler, 4 workers, with and without")
        out["straggler"] = straggler(cfg)
        tables.append(straggler_table(out["straggler"]))
    emit(out, tables, args.json)


if __name__ == "__main__":
    main()
