"""Transformer benchmark: time to a validation loss on the shakespeare task, and own-loop overhead.

The built-in task ``trainer.tasks.shakespeare`` (nanoGPT's CPU GPT, 0.80M parameters, batch
12 per worker, AdamW lr 1e-3, gradients clipped at 1.0; ``val_loss`` over 480 fixed
validation windows). Every worker process starts from the same weights (seed 0).

- ``tta``: wall time from launch until EVERY worker has had an evaluation with
  ``val_loss <= --target`` (1.90), side by side and interleaved rep by rep:
  one plain process using all cores (``torch.set_num_threads(os.cpu_count())``), gossip x2
  and x4 through ``gossip-train local --task shakespeare`` (default period 20, the
  launcher's threads per peer: cores // peers, at least 1), and DDP (gloo) x2 and x4 with
  one thread per rank, each rank on its own shard (``sk.data(rank, world)``), so every
  variant trains batch 12 per worker (DDP and gossip: 12 x workers samples per step of the
  swarm). Everything evaluates every ``--eval-every`` steps on the same set with the same
  ``sk.metrics``: each gossip peer its own model; DDP rank 0 only (its ranks hold the same
  weights; the others wait for it). Time zero is just before the first process of a variant
  is started, so interpreter start, imports, data, rendezvous and every evaluation are
  included. One process and DDP stop at the evaluation that reaches the target; gossip
  peers run their whole step budget (the launcher cannot be stopped at a metric), and
  their target time is read from their ``eval`` events (as ``tta.py`` does). A
  variant that does not reach the target within its budget reports its best loss.
- ``overhead``: the user's own loop (``benchmarks/_lm_worker.py --job ownloop``; batch 12,
  AdamW, one thread, ``--overhead-warmup`` untimed then ``--overhead-steps`` timed steps):
  plain against wrapped in ``GossipOptimizer`` with no neighbour (the wrapper's own cost,
  one process alone), and two processes of the wrapped loop gossiping with each other
  (period 20) against two processes of the plain loop at the same time (the same CPU
  contention). For the pairs, ms/step is measured over the window in which both run their
  timed steps.

    .venv/bin/python benchmarks/transformer.py                    # full: ~30-32 min on 2 cores
    .venv/bin/python benchmarks/transformer.py --quick            # smoke run, ~2-3 min
    .venv/bin/python benchmarks/transformer.py --only overhead --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    REPO,
    Launch,
    code_version,
    command_line,
    emit,
    fmt,
    launch_local,
    load_now,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    python_cmd,
    require_result,
    run_ranks,
    wait_ready,
)

log = logging.getLogger(__name__)

MEASURES = ("tta", "overhead")
CORES = os.cpu_count() or 1
BATCH = 12  # the task's batch size, per worker


@dataclass(frozen=True)
class LMBenchConfig:
    # Validation loss every worker must reach (nanoGPT reports ~1.88 after 2000 steps of
    # this configuration with a decaying lr; ours is constant, so it needs more).
    target: float = 1.90
    # Steps between evaluations, in every variant.
    eval_every: int = 100
    # Step budgets: the one process, and each gossip peer / DDP rank. One process and DDP stop
    # at the target; gossip peers always run their budget.
    single_max_steps: int = 3000
    worker_max_steps: int = 2500
    # Gossip x4 peers get their own budget (0: as above): a gossip run always runs its whole
    # budget, x4 is the slowest per step (4 processes on 2 cores) and needs fewer steps per
    # peer than x2 (measured on 2 cores: the last x4 peer reached 1.90 at step 1900, x2 at
    # 2100, one process at 2400, DDP x2 at 1400 and x4 at 900).
    gossip4_max_steps: int = 2300
    gossip_peers: tuple[int, ...] = (2, 4)
    ddp_worlds: tuple[int, ...] = (2, 4)
    clip_grad: float = 1.0
    # Interleaved repetitions; medians are reported.
    reps: int = 1
    # Own-loop overhead: timed steps after untimed warm-up steps; the gossip period.
    overhead_steps: int = 300
    overhead_warmup: int = 20
    period: int = 20
    # Deadline for one variant (all its processes).
    timeout: float = 3600.0


QUICK = LMBenchConfig(
    target=3.0,
    eval_every=50,
    single_max_steps=150,
    worker_max_steps=150,
    gossip4_max_steps=0,
    overhead_steps=60,
    overhead_warmup=10,
    timeout=600.0,
)


def worker_cmd(*args: str) -> list[str]:
    return [*python_cmd(), str(BENCH_DIR / "_lm_worker.py"), *args]


def curve_rate(curve: Sequence[Sequence[float]]) -> float | None:
    """Steps per second between the first and the last evaluation (evaluations included)."""
    if len(curve) < 2 or curve[-1][1] <= curve[0][1]:
        return None
    return (curve[-1][0] - curve[0][0]) / (curve[-1][1] - curve[0][1])


# -- one process and DDP -----------------------------------------------------------------------
def ddp_tta(world: int, cfg: LMBenchConfig) -> dict[str, Any]:
    """``world`` == 1: one plain process on every core; else DDP (gloo), one thread per rank."""
    threads = CORES if world == 1 else 1
    budget = cfg.single_max_steps if world == 1 else cfg.worker_max_steps
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    load = load_now()
    with tempfile.TemporaryDirectory() as tmp:
        job = [
            "--job", "tta", "--world", str(world), "--init", f"file://{Path(tmp) / 'rdv'}",
            "--threads", str(threads), "--target", str(cfg.target),
            "--max-steps", str(budget), "--eval-every", str(cfg.eval_every),
            "--clip-grad", str(cfg.clip_grad),
        ]  # fmt: skip
        launched = time.time()
        cmds = [
            worker_cmd("--rank", str(rank), "--launch", repr(launched), *job)
            for rank in range(world)
        ]
        results = run_ranks(
            cmds,
            env,
            launched + cfg.timeout,
            lambda out, rank: require_result(out, f"rank {rank}/{world}"),
        )
    wall = time.time() - launched
    r0 = results[0]
    curve, reached = r0["curve"], r0["reached"]
    last = curve[-1][2] if curve else None
    return {
        "name": "one process" if world == 1 else f"DDP gloo x{world}",
        "workers": world,
        "threads_per_worker": threads,
        "max_steps": budget,
        "reached": reached is not None,
        "time_to_target_s": reached[1] if reached else None,
        "steps_at_target": reached[0] if reached else None,
        "steps_at_target_each": [reached[0]] * world if reached else None,
        "samples_at_target": reached[0] * BATCH * world if reached else None,
        "best_val_loss": min((c[2] for c in curve), default=None),
        "last_eval_val_loss": [last] * world,  # DDP ranks hold the same weights
        "final_val_loss": [last] * world,
        "consensus_val_loss": None,
        "mb_sent_by_target": None,
        "mb_sent_by_last_step": None,
        "mb_sent_total": None,
        "startup_s": r0["first_step_s"],
        "steps_per_s_per_worker": curve_rate(curve),
        "eval_s": r0["eval_s"],
        "evals": len(curve),
        "steps_per_worker": r0["steps"],
        "trained_s": r0["end_s"],
        "wall_s": wall,
        "load_1m": [load, load_now()],
        "curves": {"rank-0": curve},
    }


# -- gossip ----------------------------------------------------------------------------------------
def reach_times(run: Launch, target: float) -> dict[str, Any]:
    """Per peer, its first eval with val_loss <= target; the time when every peer had one."""
    evals = sorted(run.events("eval"), key=lambda e: e["t"])
    peers = [p["name"] for p in run.summary["peers"]]
    curves = {
        p: [[e["step"], round(run.since_launch(e["t"]), 3), e["metrics"]["val_loss"]]
            for e in evals if e["peer"] == p]
        for p in peers
    }  # fmt: skip
    first = {}
    for p, curve in curves.items():
        hit = next((c for c in curve if c[2] <= target), None)
        if hit is not None:
            first[p] = hit
    every = len(first) == len(peers)
    return {
        "every_peer_s": max(c[1] for c in first.values()) if every else None,
        "steps_each": [first[p][0] for p in peers] if every else None,
        "curves": curves,
    }


def sent_by(run: Launch, peers: list[str], when: float | None) -> dict[str, Any]:
    """MB each peer had sent by ``when`` (seconds since launch) and by its last step.

    From RUN_DIR/progress.jsonl (every peer's counters, about twice a second). A peer that
    has finished keeps averaging while it lingers (every 50 ms, with peers still training and
    with each other), so the totals in summary.json hold far more than training needed.
    """
    prog = run.progress()
    by_target, by_last_step = [], []
    for p in peers:
        points = [e for e in prog.get(p, []) if e.get("kind", "progress") == "progress"]
        if when is not None:
            before = [e for e in points if run.since_launch(e["t"]) <= when]
            by_target.append(before[-1]["bytes_sent"] / 1e6 if before else 0.0)
        done = [e for e in points if e["step"] >= e["total"]]
        end = done[0] if done else (points[-1] if points else None)
        by_last_step.append(end["bytes_sent"] / 1e6 if end else None)
    return {"by_target": by_target if when is not None else None, "by_last_step": by_last_step}


def gossip_tta(cfg: LMBenchConfig, work: Path, peers: int, tag: str) -> dict[str, Any]:
    budget = cfg.gossip4_max_steps if peers == 4 and cfg.gossip4_max_steps else cfg.worker_max_steps
    args = [
        "--task", "shakespeare", "--peers", str(peers), "--steps", str(budget),
        "--eval-every", str(cfg.eval_every), "--clip-grad", str(cfg.clip_grad),
        "--timeout", str(int(cfg.timeout)),
    ]  # fmt: skip
    load = load_now()
    run = launch_local(work / f"{tag}-gossip-x{peers}", args, cfg.timeout + 60)
    reach = reach_times(run, cfg.target)
    t = reach["every_peer_s"]
    summary = run.summary
    prs = summary["peers"]
    names = [p["name"] for p in prs]
    started = [e["t"] for e in run.events("started")]
    curves = [reach["curves"][n] for n in names]
    best = [min((c[2] for c in cv), default=None) for cv in curves]
    sent = sent_by(run, names, t)
    return {
        "name": f"gossip x{peers}",
        "workers": peers,
        # What the launcher gives each peer (trainer.config.default_threads).
        "threads_per_worker": max(1, CORES // peers),
        "max_steps": budget,
        "reached": t is not None,
        "time_to_target_s": t,
        "steps_at_target": max(reach["steps_each"]) if t is not None else None,
        "steps_at_target_each": reach["steps_each"],
        "samples_at_target": sum(reach["steps_each"]) * BATCH if t is not None else None,
        # The level every peer has reached at some evaluation: max over peers of each best.
        "best_val_loss": max(b for b in best if b is not None) if all(best) else None,
        "best_val_loss_each": best,
        "last_eval_val_loss": [cv[-1][2] if cv else None for cv in curves],
        # summary.json's per-peer metric: the final model, after lingering (averaging on).
        "final_val_loss": [p["metrics"].get("val_loss") for p in prs],
        "consensus_val_loss": (summary.get("consensus_metrics") or {}).get("val_loss"),
        "mb_sent_by_target": sent["by_target"],
        "mb_sent_by_last_step": sent["by_last_step"],
        "mb_sent_total": [p["bytes_sent"] / 1e6 for p in prs],
        "exchanges": [p["exchanges"] for p in prs],
        "startup_s": run.since_launch(min(started)) if started else None,
        "steps_per_s_per_worker": median([curve_rate(cv) for cv in curves]),
        "eval_s": None,  # inside each peer's training thread; not reported by the launcher
        "evals": sum(len(cv) for cv in curves),
        "steps_per_worker": max(p["steps"] for p in prs),
        "launcher_offset_s": run.offset,
        "wall_s": run.exit_s,
        "load_1m": [load, load_now()],
        "curves": reach["curves"],
        "run_dir": str(run.run_dir),
    }


def time_to_target(cfg: LMBenchConfig, work: Path) -> dict[str, Any]:
    def ddp_job(world: int) -> Callable[[str], dict[str, Any]]:
        return lambda tag: ddp_tta(world, cfg)

    jobs: list[tuple[str, Callable[[str], dict[str, Any]]]] = [("one process", ddp_job(1))]
    jobs += [(f"gossip x{n}", partial(gossip_tta, cfg, work, n)) for n in cfg.gossip_peers]
    jobs += [(f"DDP gloo x{w}", ddp_job(w)) for w in cfg.ddp_worlds]
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in jobs}
    for rep in range(cfg.reps):
        for name, job in jobs:
            log.info("tta rep %d/%d: %s starts (load %.1f)", rep + 1, cfg.reps, name, load_now())
            t0 = time.monotonic()
            r = job(f"r{rep + 1}")
            reps[name].append(r)
            log.info(
                "tta rep %d/%d: %s done in %.0f s: %s (load %.1f)", rep + 1, cfg.reps, name,
                time.monotonic() - t0,
                f"val_loss <= {cfg.target} at {r['time_to_target_s']:.1f} s, "
                f"step {r['steps_at_target']}" if r["reached"]
                else f"not reached, best {fmt(r['best_val_loss'], '.3f')}", load_now(),
            )  # fmt: skip
    rows = {name: tta_median(results) for name, results in reps.items()}
    return {"rows": rows, "reps": reps, "ratios": tta_ratios(reps)}


def tta_median(results: list[dict[str, Any]]) -> dict[str, Any]:
    last = results[-1]
    return {
        "n": len(results),
        "reached": sum(1 for r in results if r["reached"]),
        "workers": last["workers"],
        "threads_per_worker": last["threads_per_worker"],
        "max_steps": last["max_steps"],
        "time_to_target_s": median([r["time_to_target_s"] for r in results]),
        "times_s": [r["time_to_target_s"] for r in results],
        "steps_at_target": median([r["steps_at_target"] for r in results]),
        "best_val_loss": median([r["best_val_loss"] for r in results]),
        "startup_s": median([r["startup_s"] for r in results]),
        "steps_per_s_per_worker": median([r["steps_per_s_per_worker"] for r in results]),
        "eval_s": median([r["eval_s"] for r in results]),
        "wall_s": median([r["wall_s"] for r in results]),
        "samples_at_target": median([r["samples_at_target"] for r in results]),
        "last_eval_val_loss": last["last_eval_val_loss"],  # of the last rep
        "final_val_loss": last["final_val_loss"],  # of the last rep
        "consensus_val_loss": median([r["consensus_val_loss"] for r in results]),
        **{
            key: median([statistics.mean(r[key]) for r in results if r[key]])
            for key in ("mb_sent_by_target", "mb_sent_by_last_step", "mb_sent_total")
        },
        "load_1m": [r["load_1m"][0] for r in results],
    }


def tta_ratios(reps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Time / reference time, paired within each rep, then the median of the pairs."""
    pairs = [("gossip x2", "one process"), ("gossip x2", "DDP gloo x2"),
             ("gossip x4", "one process"), ("gossip x4", "DDP gloo x4"),
             ("DDP gloo x2", "one process"), ("DDP gloo x4", "one process")]  # fmt: skip
    return paired_ratios(reps, pairs)


# -- own-loop overhead ---------------------------------------------------------------------------
class OwnLoopWorker:
    """One ``_lm_worker.py --job ownloop`` process: started, READY read, then told to go."""

    def __init__(self, args: Sequence[str], ready_timeout: float = 120.0) -> None:
        cmd = worker_cmd("--job", "ownloop", *args)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            self.addr = wait_ready(self.proc, ready_timeout)
        except RuntimeError:
            self.kill()
            raise

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        if self.proc.returncode != 0:
            raise RuntimeError(f"own-loop worker exited with {self.proc.returncode}")
        return require_result(out, "own-loop worker")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def overhead_run(cfg: LMBenchConfig, work: Path, tag: str, procs: int, gossip: bool) -> dict:
    base = ["--steps", str(cfg.overhead_steps), "--warmup", str(cfg.overhead_warmup),
            "--threads", "1", "--clip-grad", str(cfg.clip_grad), "--period", str(cfg.period),
            "--peers", str(procs)]  # fmt: skip
    load = load_now()
    workers: list[OwnLoopWorker] = []
    try:
        for i in range(procs):
            args = [*base, "--index", str(i)]
            if gossip:
                run_dir = work / f"{tag}-ownloop-gossip-x{procs}" / f"peer-{i}"
                run_dir.mkdir(parents=True, exist_ok=True)
                args += ["--gossip", "--run-dir", str(run_dir)]
                if i > 0:
                    args += ["--join", workers[0].addr]
            workers.append(OwnLoopWorker(args))
        for w in workers:
            w.go()
        results = [w.result(cfg.timeout) for w in workers]
    finally:
        for w in workers:
            w.kill()
    # The window in which every worker ran its timed steps.
    lo = max(r["start"] for r in results)
    hi = min(r["ends"][-1] for r in results)
    per = []
    for r in results:
        inside = [t for t in r["ends"] if lo <= t <= hi]
        window = 1e3 * (inside[-1] - inside[0]) / (len(inside) - 1) if len(inside) > 1 else None
        per.append(
            {
                "ms_per_step": window if procs > 1 else 1e3 * r["seconds"] / r["steps"],
                "ms_per_step_whole": 1e3 * r["seconds"] / r["steps"],
                "steps_in_window": len(inside),
                "cpu_ms_per_step": 1e3 * r["cpu_s"] / r["steps"],
                "train_thread_cpu_ms_per_step": 1e3 * r["train_thread_cpu_s"] / r["steps"],
                "exchanges": r.get("exchanges"),
                "mb_sent": (r.get("bytes_sent") or 0) / 1e6 if gossip else None,
                "gossip_cpu_seconds": r.get("gossip_cpu_seconds"),
            }
        )
    return {
        "processes": procs,
        "gossip": gossip,
        "ms_per_step": median([p["ms_per_step"] for p in per]),
        "cpu_ms_per_step": median([p["cpu_ms_per_step"] for p in per]),
        "overlap_s": hi - lo,
        "per_worker": per,
        "load_1m": [load, load_now()],
    }


OVERHEAD_VARIANTS = {
    "plain, 1 process": (1, False),
    "GossipOptimizer, no neighbour": (1, True),
    "plain, 2 processes": (2, False),
    "GossipOptimizer, 2 peers gossiping": (2, True),
}


def overhead(cfg: LMBenchConfig, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in OVERHEAD_VARIANTS}
    names = list(OVERHEAD_VARIANTS)
    for rep in range(cfg.reps):
        # Alternate the order within each pair, so a load change does not favour one side.
        order = names if rep % 2 == 0 else [names[1], names[0], names[3], names[2]]
        for name in order:
            procs, gossip = OVERHEAD_VARIANTS[name]
            log.info("overhead rep %d/%d: %s starts (load %.1f)", rep + 1, cfg.reps, name,
                     load_now())  # fmt: skip
            t0 = time.monotonic()
            r = overhead_run(cfg, work, f"r{rep + 1}", procs, gossip)
            runs[name].append(r)
            log.info("overhead rep %d/%d: %s done in %.0f s: %.1f ms/step", rep + 1, cfg.reps,
                     name, time.monotonic() - t0, r["ms_per_step"])  # fmt: skip

    def ratio(a: str, b: str, key: str) -> dict[str, Any]:
        each = [x[key] / y[key] - 1 for x, y in zip(runs[a], runs[b], strict=True)]
        return {"median": median(each), "each": each}

    rows = {
        name: {
            "ms_per_step": median([r["ms_per_step"] for r in rs]),
            "cpu_ms_per_step": median([r["cpu_ms_per_step"] for r in rs]),
            "each_ms": [r["ms_per_step"] for r in rs],
        }
        for name, rs in runs.items()
    }
    return {
        "rows": rows,
        "overhead": {
            "wrapper_alone_vs_plain": ratio(names[1], names[0], "ms_per_step"),
            "wrapper_alone_vs_plain_cpu": ratio(names[1], names[0], "cpu_ms_per_step"),
            "gossiping_pair_vs_plain_pair": ratio(names[3], names[2], "ms_per_step"),
            "gossiping_pair_vs_plain_pair_cpu": ratio(names[3], names[2], "cpu_ms_per_step"),
        },
        "runs": runs,
    }


# -- tables ---------------------------------------------------------------------------------------
def tta_table(r: dict[str, Any], cfg: LMBenchConfig) -> str:
    rows, details = [], []
    for name, m in r["rows"].items():
        time_cell = fmt(m["time_to_target_s"], ".1f", "not reached")
        if m["time_to_target_s"] is None:
            time_cell += f" (best {fmt(m['best_val_loss'], '.3f')})"
        rows.append([
            name, f"{m['workers']} x {m['threads_per_worker']}", time_cell,
            ", ".join(fmt(t, ".1f", "n/r") for t in m["times_s"]), f"{m['reached']}/{m['n']}",
            fmt(m["steps_at_target"], ".0f"), fmt(m["samples_at_target"], ".0f"),
            m["max_steps"], fmt(m["startup_s"], ".1f"), fmt(m["steps_per_s_per_worker"], ".2f"),
            ", ".join(f"{x:.1f}" for x in m["load_1m"]),
        ])  # fmt: skip
        gossip = m["consensus_val_loss"] is not None
        details.append([
            name, ", ".join(fmt(v, ".3f") for v in m["last_eval_val_loss"]),
            ", ".join(fmt(v, ".3f") for v in m["final_val_loss"]) if gossip else "-",
            fmt(m["consensus_val_loss"], ".3f"), fmt(m["mb_sent_by_target"], ".0f"),
            fmt(m["mb_sent_by_last_step"], ".0f"), fmt(m["mb_sent_total"], ".0f"),
            fmt(m["eval_s"], ".0f"), fmt(m["wall_s"], ".0f"),
        ])  # fmt: skip
    table = markdown_table(
        ["run", "workers x threads", f"time to val_loss <= {cfg.target:g}, every worker (s)",
         "each rep (s)", "reached", "steps per worker at target", "samples at target (all)",
         "step budget", "start-up (s)", "steps/s per worker", "load at start"],
        rows,
    )  # fmt: skip
    detail = markdown_table(
        ["run (last rep)", "val loss at last eval (each worker)",
         "after linger (each peer)", "consensus val loss", "MB sent per peer by target",
         "... by its last step", "... in all (linger incl.)", "eval s (rank 0)", "wall (s)"],
        details,
    )  # fmt: skip
    ratios = markdown_table(
        ["time ratio (paired by rep)", "median", "each"],
        [[k, fmt(v["median"]), ", ".join(f"{x:.2f}" for x in v["each"])]
         for k, v in r["ratios"].items()],
    )  # fmt: skip
    return table + "\n\n" + detail + "\n\n" + ratios


def overhead_table(r: dict[str, Any]) -> str:
    rows = [
        [name, fmt(m["ms_per_step"], ".1f"), fmt(m["cpu_ms_per_step"], ".1f"),
         ", ".join(f"{x:.1f}" for x in m["each_ms"])]
        for name, m in r["rows"].items()
    ]  # fmt: skip
    o = r["overhead"]
    rows.append(["overhead: no neighbour vs plain",
                 fmt(o["wrapper_alone_vs_plain"]["median"], "+.1%"),
                 fmt(o["wrapper_alone_vs_plain_cpu"]["median"], "+.1%"),
                 ", ".join(f"{x:+.1%}" for x in o["wrapper_alone_vs_plain"]["each"])])  # fmt: skip
    rows.append(
        [
            "overhead: 2 gossiping vs 2 plain",
            fmt(o["gossiping_pair_vs_plain_pair"]["median"], "+.1%"),
            fmt(o["gossiping_pair_vs_plain_pair_cpu"]["median"], "+.1%"),
            ", ".join(f"{x:+.1%}" for x in o["gossiping_pair_vs_plain_pair"]["each"]),
        ]
    )
    return markdown_table(
        ["own loop (1 thread per process)", "wall ms/step (median)",
         "process CPU ms/step (median)", "each rep"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (~2-3 min)")
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated: tta,overhead")
    parser.add_argument("--reps", type=int, default=0, help="interleaved repetitions (default 1)")
    parser.add_argument("--target", type=float, default=None, help="val_loss (default 1.90)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps (default 100)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="budget per gossip peer / DDP rank (2500)"
    )
    parser.add_argument(
        "--max-steps-single", type=int, default=None, help="budget of the one process (3000)"
    )
    parser.add_argument(
        "--max-steps-gossip4",
        type=int,
        default=None,
        help="budget per gossip x4 peer (default 2300; 0: --max-steps)",
    )
    parser.add_argument("--overhead-steps", type=int, default=None, help="timed steps (300)")
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs here (else temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MEASURES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(MEASURES)}")
    cfg = QUICK if args.quick else LMBenchConfig()
    overrides = {
        "reps": args.reps or None,
        "target": args.target,
        "eval_every": args.eval_every,
        "worker_max_steps": args.max_steps,
        "single_max_steps": args.max_steps_single,
        "gossip4_max_steps": args.max_steps_gossip4,
        "overhead_steps": args.overhead_steps,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    work = args.keep or Path(tempfile.mkdtemp(prefix="lm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "transformer",
        "command": command_line(),
        "machine": machine_info(),
        "config": asdict(cfg),
    }
    tables: list[str] = []
    t0 = time.monotonic()
    try:
        if "tta" in only:
            r = time_to_target(cfg, work)
            result["tta"] = r
            tables.append(f"### time to val_loss <= {cfg.target:g}\n\n{tta_table(r, cfg)}")
        if "overhead" in only:
            r = overhead(cfg, work)
            result["overhead"] = r
            tables.append(f"### GossipOptimizer overhead per step\n\n{overhead_table(r)}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.monotonic() - t0
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["machine"]["commit_at_end"] = code_version()  # others may change the tree meanwhile
    emit(result, tables, args.json)


if __name__ == "__main__":
    main()
