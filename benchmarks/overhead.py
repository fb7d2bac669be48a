"""Gossip overhead per step, gossip-train side: the default period against no exchange.

2 peers through ``gossip-train local`` (``common.launch_local``: peers forked from the
pre-loaded zygote, real TCP on 127.0.0.1, one torch thread per peer), ``--linger 0``, the
default period (20 steps) against ``--period 1000000000`` (no exchange), interleaved with
the order alternating by rep; per peer, inside the window where both train: wall time per
step from RUN_DIR/progress.jsonl, CPU time per step (the whole process, and its main thread:
the peer's event loop) from /proc samples taken every 0.2 s (pids from RUN_DIR/peers.json).

    .venv/bin/python benchmarks/overhead.py                 # 3 reps, MNIST
    .venv/bin/python benchmarks/overhead.py --quick         # smoke run, bundled data set
    .venv/bin/python benchmarks/overhead.py --reps 5 --json out.json
"""

from __future__ import annotations

import logging
from typing import Any

from common import (
    GossipBenchConfig,
    Runs,
    common_args,
    fmt,
    launch_local,
    load_now,
    markdown_table,
    measure_main,
    median,
    peer_rates,
    training_window,
)

log = logging.getLogger(__name__)

NO_GOSSIP = 1_000_000_000  # --period that never comes: gossip off


def overhead_run(cfg: GossipBenchConfig, runs: Runs, gossip_on: bool) -> dict[str, Any]:
    args = [*common_args(cfg, 2, cfg.overhead_epochs), "--linger", "0"]
    if not gossip_on:
        args += ["--period", str(NO_GOSSIP)]
    load = load_now()
    run = launch_local(runs.next("gossip-on" if gossip_on else "gossip-off"), args, cfg.timeout)
    rates = peer_rates(run, training_window(run))
    peers = run.summary["peers"]
    finished = {e["peer"]: e for e in run.events("finished")}
    exch = sum(p["exchanges"] or 0 for p in peers)
    exch_s = sum(finished[p["name"]].get("exchange_seconds", 0.0) for p in peers)
    return {
        "gossip": gossip_on,
        "ms_per_step": median([1e3 / r["steps_per_s"] for r in rates.values() if r["steps_per_s"]]),
        "cpu_ms_per_step": median([r["cpu_per_step_ms"] for r in rates.values()]),
        "loop_cpu_ms_per_step": median([r.get("loop_cpu_per_step_ms") for r in rates.values()]),
        "locked_step_ms": median([1e3 * f.get("step_seconds", 0.0) for f in finished.values()]),
        "exchanges": exch,
        "exchange_ms_mean": 1e3 * exch_s / exch if exch else None,
        "per_peer": rates,
        "peak_rss_mb": max((s.hwm for s in run.samples), default=0) / 1e6,
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def overhead(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for rep in range(cfg.reps):
        log.info("overhead rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        # Alternate which goes first, so a load change mid-rep does not favour one side.
        order = (True, False) if rep % 2 == 0 else (False, True)
        for gossip_on in order:
            (on if gossip_on else off).append(overhead_run(cfg, runs, gossip_on))
    wall = [a["ms_per_step"] / b["ms_per_step"] - 1 for a, b in zip(on, off, strict=True)]
    cpu = [
        a["cpu_ms_per_step"] / b["cpu_ms_per_step"] - 1
        for a, b in zip(on, off, strict=True)
        if a["cpu_ms_per_step"] and b["cpu_ms_per_step"]
    ]
    return {
        "ms_per_step_on": median([r["ms_per_step"] for r in on]),
        "ms_per_step_off": median([r["ms_per_step"] for r in off]),
        "cpu_ms_per_step_on": median([r["cpu_ms_per_step"] for r in on]),
        "cpu_ms_per_step_off": median([r["cpu_ms_per_step"] for r in off]),
        "loop_cpu_ms_per_step_on": median([r["loop_cpu_ms_per_step"] for r in on]),
        "loop_cpu_ms_per_step_off": median([r["loop_cpu_ms_per_step"] for r in off]),
        "wall_overhead": median(wall),
        "wall_overhead_each": wall,
        "cpu_overhead": median(cpu),
        "cpu_overhead_each": cpu,
        "exchange_ms_mean": median([r["exchange_ms_mean"] for r in on]),
        "runs": {"on": on, "off": off},
    }


def overhead_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    return markdown_table(
        ["gossip", "wall ms/step (median)", "CPU ms/step (median)",
         "event-loop thread CPU ms/step", "mean exchange ms"],
        [
            ["on (period 20)", fmt(r["ms_per_step_on"]), fmt(r["cpu_ms_per_step_on"]),
             fmt(r.get("loop_cpu_ms_per_step_on"), ".3f"), fmt(r["exchange_ms_mean"])],
            ["off", fmt(r["ms_per_step_off"]), fmt(r["cpu_ms_per_step_off"]),
             fmt(r.get("loop_cpu_ms_per_step_off"), ".3f"), "-"],
            ["overhead", fmt(r["wall_overhead"], "+.0%"), fmt(r["cpu_overhead"], "+.0%"), "-",
             "wall each rep: " + ", ".join(f"{x:+.0%}" for x in r["wall_overhead_each"])],
        ],
    )  # fmt: skip


def main() -> None:
    measure_main("overhead", __doc__, overhead, overhead_table)


if __name__ == "__main__":
    main()
