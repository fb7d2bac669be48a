"""One worker of the training baselines: a plain process, or one rank of torch DDP over gloo.

The seed MLP on MNIST, Adam, a DistributedSampler-like split: every epoch one permutation
(seeded by the epoch) padded to a multiple of the world size, rank r takes every world-th
index from r. Two jobs:

- ``tta`` (time to accuracy): train until rank 0 measures ``--target`` test accuracy at one
  of its evaluations (every ``--eval-every`` epoch) or ``--max-epochs`` pass; rank 0 tells
  the others to stop with a broadcast at each evaluation point;
- ``throughput``: ``--warmup-steps`` then ``--steps`` timed steps; with ``--straggler R``,
  rank R sleeps ``--slowdown`` times its own compute time (its thread's CPU time for the
  step, so waiting on the others is not counted) after every step.

Each rank prints ``RESULT <json>``; times are seconds since ``--launch`` (a time.time()
taken by the launcher before it started any process), so start-up is included.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import add_max_seconds, print_result
from torch import nn

from trainer.data import load_dataset
from trainer.models import build_model, evaluate


def shard(n: int, world: int, rank: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's indices for ``epoch``, as torch's DistributedSampler would pick them."""
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=gen)
    padded = -(-n // world) * world
    if padded > n:
        perm = torch.cat([perm, perm[: padded - n]])
    return perm[rank::world]


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ddp = args.world > 1
        if self.ddp:
            dist.init_process_group(
                "gloo",
                init_method=args.init,
                rank=args.rank,
                world_size=args.world,
                timeout=datetime.timedelta(seconds=300),
            )
        data = load_dataset("mnist", Path(args.data))
        limit = args.subset or len(data.y_train)
        self.x, self.y = data.x_train[:limit], data.y_train[:limit]
        test = args.subset // 4 or len(data.y_test)
        self.x_test, self.y_test = data.x_test[:test], data.y_test[:test]
        model = build_model("mlp", data.input_shape, data.num_classes, seed=args.seed)
        self.model: nn.Module = nn.parallel.DistributedDataParallel(model) if self.ddp else model
        self.eval_model = model  # DDP wraps the same parameters
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.loss = nn.CrossEntropyLoss()
        self.steps_per_epoch = -(-len(shard(len(self.y), args.world, 0, 0, 0)) // args.batch)

    def since_launch(self) -> float:
        return time.time() - self.args.launch

    def step(self, idx: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x[idx]), self.y[idx]).backward()
        self.opt.step()

    def batches(self) -> Any:
        """Endless (epoch, step in epoch, indices) over this rank's shard."""
        epoch = 0
        while True:
            idx = shard(len(self.y), self.args.world, self.args.rank, epoch, self.args.seed)
            for s in range(self.steps_per_epoch):
                yield epoch, s, idx[s * self.args.batch : (s + 1) * self.args.batch]
            epoch += 1

    # -- time to accuracy ------------------------------------------------------------------
    def spent(self) -> bool:
        """The --max-seconds budget is used up (rank 0's clock decides, for every rank)."""
        return 0 < self.args.max_seconds <= time.time() - self.args.launch

    def should_stop(self, acc: float, epochs: float) -> bool:
        """Rank 0 decides; every rank learns it at the same step."""
        stop = torch.tensor([0.0])
        if self.args.rank == 0 and (
            acc >= self.args.target or epochs >= self.args.max_epochs or self.spent()
        ):
            stop[0] = 1.0
        if self.ddp:
            dist.broadcast(stop, src=0)
        return bool(stop[0] > 0)

    def time_to_accuracy(self) -> dict[str, Any]:
        spe, frac = self.steps_per_epoch, self.args.eval_every
        # Steps (1-based, within an epoch) after which rank 0 evaluates: every `frac` epoch.
        points = {min(spe, max(1, round(spe * frac * k))) for k in range(1, int(1 / frac) + 2)}
        curve: list[list[float]] = []
        first_step: float | None = None
        reached: list[float] | None = None
        eval_seconds, steps = 0.0, 0
        for epoch, s, idx in self.batches():
            if first_step is None:
                first_step = self.since_launch()
            self.step(idx)
            steps += 1
            at_eval = s + 1 in points
            if not at_eval and self.args.max_seconds <= 0:
                continue  # with a time budget, rank 0 says at every step whether to stop
            epochs = epoch + (s + 1) / spe
            acc = -1.0
            if self.args.rank == 0 and (at_eval or self.spent()):
                t0 = time.perf_counter()
                acc = evaluate(self.eval_model, self.x_test, self.y_test)
                eval_seconds += time.perf_counter() - t0
                curve.append([round(epochs, 4), round(self.since_launch(), 3), acc])
                if reached is None and acc >= self.args.target:
                    reached = curve[-1]
            if self.should_stop(acc, epochs):
                break
        return {
            "steps": steps,
            "startup_s": first_step,
            "end_s": self.since_launch(),
            "eval_s": eval_seconds,
            "reached": reached,  # [epochs, seconds since launch, accuracy] or None
            "curve": curve,
        }

    # -- throughput and the straggler ---------------------------------------------------------
    def throughput(self) -> dict[str, Any]:
        slow = self.args.rank == self.args.straggler
        batches = self.batches()
        compute = slept = 0.0
        t0 = 0.0
        for i in range(self.args.warmup_steps + self.args.steps):
            if i == self.args.warmup_steps:
                t0 = time.perf_counter()
                compute = slept = 0.0
            _, _, idx = next(batches)
            c0 = time.thread_time()
            self.step(idx)
            cpu = time.thread_time() - c0
            compute += cpu
            if slow:
                time.sleep(self.args.slowdown * cpu)
                slept += self.args.slowdown * cpu
        seconds = time.perf_counter() - t0
        return {
            "steps": self.args.steps,
            "seconds": seconds,
            "steps_per_s": self.args.steps / seconds,
            "compute_cpu_s": compute,
            "slept_s": slept,
            "straggler": slow,
        }

    def close(self) -> None:
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("tta", "throughput"), required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1, help="1: a plain process, no DDP")
    parser.add_argument("--init", default="", help="init_method URL (file://...)")
    parser.add_argument("--launch", type=float, required=True, help="launcher's time.time()")
    parser.add_argument("--data", required=True, help="MNIST folder")
    parser.add_argument("--subset", type=int, default=0, help="first N train samples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", type=float, default=0.975)
    parser.add_argument("--max-epochs", type=float, default=20.0)
    add_max_seconds(parser)
    parser.add_argument("--eval-every", type=float, default=0.25, help="epochs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--straggler", type=int, default=-1, help="rank to slow down")
    parser.add_argument("--slowdown", type=float, default=3.0, help="sleep / compute per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worker = Worker(args)
    result = worker.time_to_accuracy() if args.job == "tta" else worker.throughput()
    worker.close()
    result["rank"] = args.rank
    result["closed_s"] = worker.since_launch()  # after the barrier and group teardown
    print_result(result)


if __name__ == "__main__":
    main()
