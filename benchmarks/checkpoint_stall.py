"""How long does taking a checkpoint stall the training thread?

Trains the seed MLP (784-128-10, Adam, batch 32) on random data in a thread, as a peer
does, and every ``--every`` steps takes a checkpoint the way the trainer does: under the
step lock, clone model and optimizer to CPU and hand the copy to a BackgroundCheckpointer,
whose worker thread serializes and writes it. Steps are timed in three kinds:

- normal: no checkpoint taken, no write in flight;
- in_flight: a background write runs meanwhile (contention for the GIL and the cores);
- checkpoint: the step that also took the snapshot.

stall_ms is the median checkpoint step minus the median normal step.

Run: PYTHONPATH=. .venv/bin/python benchmarks/checkpoint_stall.py [--steps N] [--every K]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import emit, machine_info, markdown_table, summarize

from trainer.checkpoint import (
    BackgroundCheckpointer,
    CheckpointStore,
    build_checkpoint,
    snapshot_model_optimizer,
)
from trainer.models import build_model

BATCH = 32
POOL = 4096  # random samples drawn from; large enough that batches vary
WARMUP = 100  # first steps not timed: allocator and kernel warm-up


def ms(seconds: float) -> float:
    return seconds * 1e3


def p95(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)


class Run:
    """The training loop under test, plus what it measured."""

    def __init__(self, writer: BackgroundCheckpointer, steps: int, every: int) -> None:
        self.writer = writer
        self.steps = steps
        self.every = every
        self.lock = threading.Lock()
        self.model = build_model("mlp", (1, 28, 28), 10, seed=0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(POOL, 1, 28, 28, generator=gen)
        self.y = torch.randint(0, 10, (POOL,), generator=gen)
        self.times: dict[str, list[float]] = {"normal": [], "in_flight": [], "checkpoint": []}
        self.snapshot: list[float] = []

    def _train_step(self) -> None:
        idx = torch.randint(0, POOL, (BATCH,))
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        self.opt.step()

    def _checkpoint(self, step: int) -> None:
        start = time.perf_counter()
        weights, optim = snapshot_model_optimizer(self.model, self.opt)
        state = build_checkpoint(model=weights, optimizer=optim, step=step, config={"model": "mlp"})
        self.writer.submit(state)
        self.snapshot.append(time.perf_counter() - start)

    def loop(self) -> None:
        for step in range(1, self.steps + 1):
            take = step % self.every == 0
            busy = self.writer.in_flight
            start = time.perf_counter()
            with self.lock:
                self._train_step()
                if take:
                    self._checkpoint(step)
            elapsed = time.perf_counter() - start
            if step > WARMUP:
                kind = "checkpoint" if take else ("in_flight" if busy else "normal")
                self.times[kind].append(elapsed)


def kind_row(name: str, values: Sequence[float]) -> dict[str, Any]:
    s = summarize(values)
    return {
        "kind": name,
        "n": s.n,
        "median_ms": ms(s.median),
        "p95_ms": ms(p95(values)),
        "worst_ms": ms(s.worst),
    }


def measure(directory: Path, steps: int, every: int) -> dict[str, Any]:
    store = CheckpointStore(directory, keep=3)
    with BackgroundCheckpointer(store) as writer:
        run = Run(writer, steps, every)
        thread = threading.Thread(target=run.loop, name="train")
        thread.start()
        thread.join()
        writer.flush(60.0)
        written, replaced, error = writer.written, writer.replaced, writer.last_error
    rows = [kind_row(k, v) for k, v in run.times.items() if v]
    medians = {r["kind"]: r["median_ms"] for r in rows}
    newest = store.list()[-1]
    return {
        "rows": rows,
        "snapshot_ms": kind_row("snapshot", run.snapshot),
        "stall_ms": medians["checkpoint"] - medians["normal"],
        "in_flight_extra_ms": medians.get("in_flight", medians["normal"]) - medians["normal"],
        "checkpoint_bytes": newest.stat().st_size,
        "written": written,
        "replaced": replaced,
        "error": None if error is None else str(error),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every K steps")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.dir or Path(tmp), args.steps, args.every)
    rows = result.pop("rows")
    out = {
        "benchmark": "checkpoint_stall",
        "machine": machine_info(),
        "params": {"steps": args.steps, "every": args.every, "batch": BATCH, "model": "mlp"},
        "steps": rows,
        **result,
    }
    table_rows = [[r["kind"], r["n"], r["median_ms"], r["p95_ms"], r["worst_ms"]] for r in rows]
    snap = result["snapshot_ms"]
    table_rows.append(["snapshot", snap["n"], snap["median_ms"], snap["p95_ms"], snap["worst_ms"]])
    table = markdown_table(["step kind", "n", "median ms", "p95 ms", "worst ms"], table_rows)
    emit(out, [table], args.json)


if __name__ == "__main__":
    main()
