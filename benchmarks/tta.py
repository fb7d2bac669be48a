"""Time to accuracy, gossip-train side: launch until every peer reports the target accuracy.

The seed MLP on MNIST, batch 32, Adam 1e-3, every peer evaluating 4 times per local epoch,
run through the real command, ``gossip-train local`` (``python -m trainer.cli local``:
peers forked from the pre-loaded zygote, real TCP on 127.0.0.1, one torch thread per peer;
``common.launch_local``); time from launch until every peer has reported >= 97.5% test
accuracy, from the ``eval`` events of RUN_DIR/summary.json. Time zero is the moment this
script starts the launcher; the launcher's own clock (the ``t`` of its events) starts when
it creates the run dir, a few hundred ms later, which a watcher thread notes, so launch +
offset + t is an event's time since launch.

Interleaved, rep by rep, with one plain process and DDP (gloo) x2 and x4 from
``baselines.py``, so the ratios compare runs under the same load; with ``--hivemind-python``
(an interpreter that imports hivemind, kept out of the project's venv), also hivemind peers
(``_hivemind_peer.py``) with local updates.

    .venv/bin/python benchmarks/tta.py                  # 3 reps, MNIST
    .venv/bin/python benchmarks/tta.py --quick          # smoke run, bundled data set
    .venv/bin/python benchmarks/tta.py --reps 5 --no-baselines --json out.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import baselines
from common import (
    BENCH_DIR,
    REPO,
    GossipBenchConfig,
    Launch,
    Runs,
    common_args,
    fmt,
    launch_local,
    load_now,
    markdown_table,
    measure_main,
    median,
    paired_ratios,
    read_until,
    steps_per_epoch,
)

log = logging.getLogger(__name__)


def reach_times(run: Launch, target: float) -> dict[str, Any]:
    """When every peer had reported >= target at least once, and when all at once."""
    evals = sorted(run.events("eval"), key=lambda e: e["t"])
    peers = [p["name"] for p in run.summary["peers"]]
    first: dict[str, dict[str, Any]] = {}
    latest: dict[str, float] = {}
    together = None
    for e in evals:
        if e["accuracy"] >= target and e["peer"] not in first:
            first[e["peer"]] = e
        latest[e["peer"]] = e["accuracy"]
        if together is None and len(latest) == len(peers) and min(latest.values()) >= target:
            together = e["t"]
    every = (
        max((e["t"] for e in first.values()), default=None) if len(first) == len(peers) else None
    )
    last_step = max((e["step"] for e in first.values()), default=0)
    return {
        "every_peer_t": every,
        "all_at_once_t": together,
        "step_of_last_peer": last_step if every is not None else None,
        "curves": {p: [[e["step"], e["t"], e["accuracy"]] for e in evals if e["peer"] == p]
                   for p in peers},
    }  # fmt: skip


def gossip_tta(cfg: GossipBenchConfig, runs: Runs, peers: int) -> dict[str, Any]:
    every = max(1, round(steps_per_epoch(cfg, peers) / cfg.evals_per_epoch))
    args = [*common_args(cfg, peers, cfg.tta_epochs), "--eval-every", str(every)]
    load = load_now()
    run = launch_local(runs.next(f"tta-x{peers}"), args, cfg.timeout)
    reach = reach_times(run, cfg.target)
    t = reach["every_peer_t"]
    events = {k: min((e["t"] for e in run.events(k)), default=None) for k in ("started",)}
    spe = steps_per_epoch(cfg, peers)
    return {
        "name": f"gossip-train x{peers}",
        "peers": peers,
        "eval_every_steps": every,
        "reached": t is not None,
        "time_to_target_s": run.since_launch(t) if t is not None else None,
        "all_at_once_s": run.since_launch(reach["all_at_once_t"])
        if reach["all_at_once_t"] is not None
        else None,
        "epochs_to_target": reach["step_of_last_peer"] / spe if t is not None else None,
        "startup_s": run.since_launch(events["started"]) if events["started"] else None,
        "launcher_offset_s": run.offset,
        "final_accuracies": [p["test_accuracy"] for p in run.summary["peers"]],
        "consensus_accuracy": run.summary.get("consensus_test_accuracy"),
        "exchanges": [p["exchanges"] for p in run.summary["peers"]],
        "wall_s": run.exit_s,
        "load_1m": [load, load_now()],
        "curves": reach["curves"],
        "run_dir": str(run.run_dir),
    }


def time_to_accuracy(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if cfg.with_baselines:
        jobs.append(("single process", partial(ddp_tta, 1, cfg)))
    jobs += [(f"gossip-train x{n}", partial(gossip_tta, cfg, runs, n)) for n in cfg.tta_peers]
    if cfg.with_baselines:
        jobs += [(f"DDP gloo x{w}", partial(ddp_tta, w, cfg)) for w in (2, 4)]
    hivemind = hivemind_interpreter(cfg)
    if hivemind:
        jobs += [(f"hivemind x{n}", partial(hivemind_tta, cfg, runs, n, hivemind))
                 for n in cfg.tta_peers]  # fmt: skip
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in jobs}
    for rep in range(cfg.reps):
        for name, job in jobs:
            log.info("tta rep %d/%d: %s (load %.1f)", rep + 1, cfg.reps, name, load_now())
            reps[name].append(job())
    rows = {name: tta_median(results) for name, results in reps.items()}
    note = None if hivemind else "hivemind is not installed; its rows were skipped"
    return {"rows": rows, "reps": reps, "ratios": tta_ratios(reps), "hivemind": note}


def ddp_tta(world: int, cfg: GossipBenchConfig) -> dict[str, Any]:
    load = load_now()
    r = baselines.time_to_accuracy(world, cfg.baseline)
    r["load_1m"] = [load, load_now()]
    r.pop("curve", None)
    return r


def tta_median(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": len(results),
        "reached": sum(1 for r in results if r["reached"]),
        "time_to_target_s": median([r["time_to_target_s"] for r in results]),
        "times_s": [r["time_to_target_s"] for r in results],
        "epochs_to_target": median([r["epochs_to_target"] for r in results]),
        "startup_s": median([r["startup_s"] for r in results]),
        "load_1m": [r["load_1m"][0] for r in results],
    }


def tta_ratios(reps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Time / reference time, paired within each rep, then the median of the pairs."""
    pairs = [("gossip-train x2", "single process"), ("gossip-train x2", "DDP gloo x2"),
             ("gossip-train x2", "DDP gloo x4"), ("gossip-train x4", "single process"),
             ("gossip-train x4", "DDP gloo x4")]  # fmt: skip
    return paired_ratios(reps, pairs)


# -- hivemind ----------------------------------------------------------------------------------
def hivemind_interpreter(cfg: GossipBenchConfig) -> str | None:
    """The interpreter to run hivemind peers with, or None when it cannot import hivemind."""
    python = cfg.hivemind_python or sys.executable
    try:
        subprocess.run([python, "-c", "import hivemind"], check=True, capture_output=True,
                       timeout=300)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        log.info("hivemind: not importable by %s; skipped", python)
        return None
    return python


def hivemind_tta(cfg: GossipBenchConfig, runs: Runs, peers: int, python: str) -> dict[str, Any]:
    """N hivemind peers on 127.0.0.1; stopped once every peer has reported the target."""
    run_dir = runs.next(f"hivemind-x{peers}")
    run_dir.mkdir(parents=True)
    every = max(1, round(steps_per_epoch(cfg, peers) / cfg.evals_per_epoch))
    load = load_now()
    launched = time.time()
    spec = {
        "peers": peers, "dataset": cfg.dataset, "data_dir": cfg.data, "launch": launched,
        "eval_every": every, "max_steps": round(cfg.tta_epochs * steps_per_epoch(cfg, peers)),
        "target_batch_size": 32 * peers * cfg.hivemind_steps_between_averages,
        "matchmaking_time": cfg.hivemind_matchmaking_time, "run_id": run_dir.name,
    }  # fmt: skip
    procs: list[subprocess.Popen[str]] = []
    try:
        for index in range(peers):
            argv = [
                python,
                str(BENCH_DIR / "_hivemind_peer.py"),
                json.dumps({**spec, "index": index}),
            ]
            log_file = open(run_dir / f"peer-{index}.log", "w")  # noqa: SIM115 - the child's
            # Its own session: a hivemind peer starts a DHT process, an averager process and
            # a p2pd daemon, which must all go when the peer is stopped.
            procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                          text=True, start_new_session=True))  # fmt: skip
            log_file.close()
            if index == 0:
                spec["initial_peers"] = wait_line(procs[0], "MADDRS ", cfg.timeout)
        evals = hivemind_evals(procs, cfg.target, launched + cfg.hivemind_timeout)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return hivemind_result(peers, evals, cfg, launched, load, run_dir)


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> Any:
    return json.loads(read_until(proc, prefix, timeout, "hivemind peer"))


def hivemind_evals(procs: list[subprocess.Popen[str]], target: float, deadline: float) -> list:
    """Read every peer's EVAL lines until each has reported ``target`` (or all have ended)."""
    evals: list[dict[str, Any]] = []
    reached: set[int] = set()
    live = {p.stdout.fileno(): (i, p) for i, p in enumerate(procs) if p.stdout is not None}
    while live and len(reached) < len(procs) and time.time() < deadline:
        ready, _, _ = select.select(list(live), [], [], 1.0)
        for fd in ready:
            index, proc = live[fd]
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                del live[fd]
            elif line.startswith("EVAL "):
                ev = {**json.loads(line[5:]), "peer": index}
                evals.append(ev)
                if ev["accuracy"] >= target:
                    reached.add(index)
    return evals


def hivemind_result(peers: int, evals: list, cfg: GossipBenchConfig, launched: float,
                    load: float, run_dir: Path) -> dict[str, Any]:  # fmt: skip
    first: dict[int, dict[str, Any]] = {}
    for ev in evals:
        if ev["accuracy"] >= cfg.target:
            first.setdefault(ev["peer"], ev)
    done = len(first) == peers
    started = [e["started_s"] for e in evals if "started_s" in e]
    return {
        "name": f"hivemind x{peers}",
        "peers": peers,
        "reached": done,
        "time_to_target_s": max(e["t"] for e in first.values()) if done else None,
        "epochs_to_target": max(e["step"] for e in first.values()) / steps_per_epoch(cfg, peers)
        if done
        else None,
        "startup_s": max(started) if started else None,
        "averaging_epochs": max((e["hivemind_epoch"] for e in evals), default=0),
        "wall_s": time.time() - launched,
        "load_1m": [load, load_now()],
        "curves": evals,
        "run_dir": str(run_dir),
    }


# -- output ---------------------------------------------------------------------------------------
def tta_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    rows = []
    for name, m in r["rows"].items():
        times = ", ".join(fmt(t, ".1f", "n/r") for t in m["times_s"])
        rows.append(
            [name, fmt(m["time_to_target_s"], ".1f", "not reached"), times,
             f"{m['reached']}/{m['n']}", fmt(m["epochs_to_target"]), fmt(m["startup_s"], ".1f"),
             ", ".join(f"{x:.1f}" for x in m["load_1m"])]
        )  # fmt: skip
    table = markdown_table(
        ["run", f"time to {cfg.target:.1%}, median (s)", "each rep (s)", "reached", "epochs",
         "start-up (s)", "load at start"],
        rows,
    )  # fmt: skip
    ratios = markdown_table(
        ["ratio (paired by rep)", "median", "each"],
        [[k, fmt(v["median"]), ", ".join(f"{x:.2f}" for x in v["each"])]
         for k, v in r["ratios"].items()],
    )  # fmt: skip
    return table + "\n\n" + ratios


def main() -> None:
    measure_main("tta", __doc__, time_to_accuracy, tta_table, uses_baselines=True, hivemind=True)


if __name__ == "__main__":
    main()
