"""The fixed cost GossipOptimizer adds to each step of a user's loop, isolated.

A tiny model (Linear 16 -> 4, batch 8, SGD) makes a step cost a few hundred microseconds, so
what ``GossipOptimizer.step`` adds around the inner ``optimizer.step`` (the weights lock, the
step counter, the checkpoint and gossip-period checks, the hand-off to the gossip thread) is
not lost in the noise of a real model's step. The peer has no neighbour: exchanges are not
part of this cost (``transformer.py --only overhead`` measures them on a real model).
After a warm-up, plain and wrapped loops alternate in ``--blocks`` blocks of ``--steps``
steps each, so both see the same drift in the machine's load; the figures are the median
and the minimum over blocks (the minimum is the least disturbed).

    .venv/bin/python benchmarks/wrapper_cost.py [--steps 500] [--blocks 20] [--json out.json]
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
    p.add_argument("--steps", type=int, default=500, help="steps per block")
    p.add_argument("--blocks", type=int, default=20, help="blocks of each loop, alternating")
    p.add_argument("--quick", action="store_true", help="4 blocks of 200 steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    steps, blocks = (200, 4) if args.quick else (args.steps, args.blocks)
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float]]] = {"plain": [], "GossipOptimizer": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain = nn.Linear(16, 4)
        wrapped = nn.Linear(16, 4)
        loops = {
            "plain": (torch.optim.SGD(plain.parameters(), 0.01), plain),
            "GossipOptimizer": (
                GossipOptimizer(
                    wrapped, torch.optim.SGD(wrapped.parameters(), 0.01), run_dir=tmp, linger=0
                ),
                wrapped,
            ),
        }
        for opt, model in loops.values():
            timed_loop(opt, model, steps)  # warm-up, not counted
        for _ in range(blocks):  # alternating blocks: both see the same drift in load
            for name, (opt, model) in loops.items():
                rows[name].append(timed_loop(opt, model, steps))
        loops["GossipOptimizer"][0].close()
    stats = {
        k: {
            "wall_median": statistics.median(w for w, _ in v),
            "wall_min": min(w for w, _ in v),
            "cpu_median": statistics.median(c for _, c in v),
            "cpu_min": min(c for _, c in v),
        }
        for k, v in rows.items()
    }
    added = {key: stats["GossipOptimizer"][key] - stats["plain"][key] for key in stats["plain"]}
    result = {
        "benchmark": "wrapper_cost",
        "command": command_line(),
        "machine": machine_info(),
        "code": code_version(),
        "steps_per_block": steps,
        "blocks": blocks,
        "us_per_step": {k: {**stats[k], "each": rows[k]} for k in rows},
        "added_us_per_step": added,
    }
    headers = ["loop (Linear 16->4, batch 8, SGD)", "wall us/step median", "min",
               "training-thread CPU us/step median", "min"]  # fmt: skip
    keys = ("wall_median", "wall_min", "cpu_median", "cpu_min")
    table = markdown_table(
        headers,
        [[k, *(stats[k][x] for x in keys)] for k in stats]
        + [["added by GossipOptimizer", *(added[x] for x in keys)]],
    )
    emit(result, [table], args.json)


if __name__ == "__main__":
    main()
