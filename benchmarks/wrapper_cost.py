"""The fixed cost GossipOptimizer adds to each step of a user's loop, isolated.

A tiny model (Linear 16 -> 4, batch 8, SGD) makes a step cost a few hundred microseconds, so
what ``GossipOptimizer.step`` adds around the inner ``optimizer.step`` (the weights lock, the
step counter, the checkpoint and gossip-period checks, the hand-off to the gossip thread) is
not lost in the noise of a real model's step. The peer has no neighbour: exchanges are not
part of this cost (``transformer.py --only overhead`` measures them on a real model).
Plain and wrapped loops alternate, ``--reps`` times each; the figures are medians.

    .venv/bin/python benchmarks/wrapper_cost.py [--steps 5000] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import code_version, command_line, emit, machine_info, markdown_table
from torch import nn


def timed_loop(opt, model: nn.Module, steps: int) -> tuple[float, float]:
    """Microseconds per step: wall, and CPU of this (the training) thread."""
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    n = float(steps)
    return (time.perf_counter() - t0) / n * 1e6, (time.thread_time() - c0) / n * 1e6


def main() -> None:
    from trainer import GossipOptimizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1000 steps, 2 reps")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    steps, reps = (1000, 2) if args.quick else (args.steps, args.reps)
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float]]] = {"plain": [], "GossipOptimizer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            model = nn.Linear(16, 4)
            rows["plain"].append(
                timed_loop(torch.optim.SGD(model.parameters(), 0.01), model, steps)
            )
            model = nn.Linear(16, 4)
            opt = GossipOptimizer(
                model, torch.optim.SGD(model.parameters(), 0.01), run_dir=tmp, linger=0
            )
            rows["GossipOptimizer"].append(timed_loop(opt, model, steps))
            opt.close()
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in rows.items()
    }
    added = (
        med["GossipOptimizer"][0] - med["plain"][0],
        med["GossipOptimizer"][1] - med["plain"][1],
    )
    result = {
        "benchmark": "wrapper_cost",
        "command": command_line(),
        "machine": machine_info(),
        "code": code_version(),
        "steps": steps,
        "reps": reps,
        "us_per_step": {k: {"wall": w, "cpu": c, "each": rows[k]} for k, (w, c) in med.items()},
        "added_us_per_step": {"wall": added[0], "cpu": added[1]},
    }
    table = markdown_table(
        ["loop (Linear 16->4, batch 8, SGD)", "wall us/step", "training-thread CPU us/step"],
        [[k, w, c] for k, (w, c) in med.items()] + [["added by GossipOptimizer", *added]],
    )
    emit(result, [table], args.json)


if __name__ == "__main__":
    main()
