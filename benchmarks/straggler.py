"""Straggler, gossip-train side: the other peers' throughput while one peer runs slow.

4 peers through ``gossip-train local`` (``common.launch_local``: peers forked from the
pre-loaded zygote, real TCP on 127.0.0.1, one torch thread per peer), ``--linger 0``, with
and without ``--fault 'at=0 kind=slow-peer peer=peer-3 factor=4'`` (peer-3 sleeps 3x each
step's time after the step); the other peers' steps/s from RUN_DIR/progress.jsonl over the
window in which all four train (from the ``slowdown`` event on, with the fault).
Interleaved, rep by rep, with ``baselines.straggler`` (DDP x4, same slowdown).

    .venv/bin/python benchmarks/straggler.py                # 3 reps, MNIST
    .venv/bin/python benchmarks/straggler.py --quick        # smoke run, bundled data set
    .venv/bin/python benchmarks/straggler.py --reps 5 --no-baselines --json out.json
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace
from typing import Any

import baselines
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


def gossip_straggler_run(cfg: GossipBenchConfig, runs: Runs, slow: bool) -> dict[str, Any]:
    n = cfg.straggler_peers
    victim = f"peer-{n - 1}"
    args = [*common_args(cfg, n, cfg.straggler_epochs), "--linger", "0"]
    if slow:
        args += ["--fault", f"at=0 kind=slow-peer peer={victim} factor={cfg.slowdown:g}"]
    load = load_now()
    run = launch_local(runs.next("straggler" if slow else "no-straggler"), args, cfg.timeout)
    # With the fault, the window opens when the straggler says it has slowed down.
    slowed = [e["t"] for e in run.events("slowdown")]
    if slow and not slowed:
        raise RuntimeError(f"{run.run_dir.name}: the slow-peer fault was never applied")
    window = training_window(run, start_after=max(slowed, default=0.0))
    rates = peer_rates(run, window)
    others = [r["steps_per_s"] for p, r in rates.items() if p != victim and r["steps_per_s"]]
    if not others:
        raise RuntimeError(f"{run.run_dir.name}: all peers never trained together; more epochs")
    return {
        "straggler": slow,
        "window_s": list(window),
        "per_peer": rates,
        "others_steps_per_s": statistics.mean(others),
        "victim_steps_per_s": rates[victim]["steps_per_s"],
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def straggler(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    gossip: dict[str, list[dict[str, Any]]] = {"no": [], "slow": []}
    ddp: list[dict[str, Any]] = []
    bcfg = replace(cfg.baseline, slowdown=cfg.slowdown - 1.0)
    for rep in range(cfg.reps):
        log.info("straggler rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        gossip["no"].append(gossip_straggler_run(cfg, runs, slow=False))
        gossip["slow"].append(gossip_straggler_run(cfg, runs, slow=True))
        if cfg.with_baselines:
            load = load_now()
            d = baselines.straggler(bcfg, world=cfg.straggler_peers)
            d["load_1m"] = [load, load_now()]
            ddp.append(d)
    ratios = [
        s["others_steps_per_s"] / b["others_steps_per_s"]
        for b, s in zip(gossip["no"], gossip["slow"], strict=True)
    ]
    victim = [
        s["victim_steps_per_s"] / b["victim_steps_per_s"]
        for b, s in zip(gossip["no"], gossip["slow"], strict=True)
        if s["victim_steps_per_s"] and b["victim_steps_per_s"]
    ]
    return {
        "gossip": {
            "others_no_straggler": median([r["others_steps_per_s"] for r in gossip["no"]]),
            "others_with_straggler": median([r["others_steps_per_s"] for r in gossip["slow"]]),
            "others_ratio": median(ratios),
            "others_ratio_each": ratios,
            "straggler_speed_ratio": median(victim),
            "runs": gossip,
        },
        "ddp": {
            "others_no_straggler": median([d["no_straggler"]["others_steps_per_s"] for d in ddp]),
            "others_with_straggler": median(
                [d["with_straggler"]["others_steps_per_s"] for d in ddp]
            ),
            "others_ratio": median([d["others_ratio"] for d in ddp]),
            "others_ratio_each": [d["others_ratio"] for d in ddp],
            "runs": ddp,
        }
        if ddp
        else None,
    }


def straggler_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    g, d = r["gossip"], r["ddp"]
    rows = [
        [f"gossip-train x{cfg.straggler_peers}", fmt(g["others_no_straggler"], ".0f"),
         fmt(g["others_with_straggler"], ".0f"), fmt(g["others_ratio"], ".0%"),
         ", ".join(f"{x:.0%}" for x in g["others_ratio_each"])],
    ]  # fmt: skip
    if d:
        rows.append(
            [f"DDP gloo x{cfg.straggler_peers}", fmt(d["others_no_straggler"], ".0f"),
             fmt(d["others_with_straggler"], ".0f"), fmt(d["others_ratio"], ".0%"),
             ", ".join(f"{x:.0%}" for x in d["others_ratio_each"])]
        )  # fmt: skip
    return markdown_table(
        ["run", "others' steps/s, no straggler", "with straggler", "ratio (median)", "each rep"],
        rows,
    )


def main() -> None:
    measure_main("straggler", __doc__, straggler, straggler_table, uses_baselines=True)


if __name__ == "__main__":
    main()
