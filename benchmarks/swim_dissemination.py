"""How fast SWIM spreads a join, in the discrete-event simulator (p2p.simulation).

For each group size N: N peers that already know each other run for a warm-up on a
simulated LAN (0.5-1.5 ms one-way, ``--drop`` loss); then one new peer joins through one of
them. Measured in *simulated* seconds from the join request until ceil(0.999 N) of the N
have reported the newcomer (their "joined" event), and until all N have. Also the messages
and msgpack bytes each peer sent per simulated second: in the steady state before the join,
and from the join until 99.9% knew. Then, in a second group of N, one peer is killed: the
time until every survivor holds it dead, and how many false deaths happened on the way.

The reference is Serf's convergence model (hashicorp.com/serf, "Gossip Protocol"): with a
200 ms gossip interval and fanout 3, 99.9% of 100 nodes know in 1.54 s and of 1000 in
1.84 s; the lan() profile has the same interval and fanout. Wall time depends on the
machine; the simulated times do not.

    .venv/bin/python benchmarks/swim_dissemination.py [--quick] [--sizes 10,100,1000]
        [--trials 5] [--profile lan] [--drop 0.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from common import command_line, emit, machine_info, markdown_table

from p2p.simulation import NetConfig, Simulation
from p2p.swim import State, SwimConfig

PROFILES = {
    "local": SwimConfig.local,
    "lan": SwimConfig.lan,
    "wan": SwimConfig.wan,
    "test": SwimConfig.test,
}
# Serf's convergence model at gossip interval 200 ms and fanout 3: N -> seconds to 99.9%.
SERF_MODEL = {100: 1.54, 1000: 1.84}
# Simulated seconds before the join, so that start-up staggering has settled.
WARMUP = 5.0
# Simulated seconds the join gets to reach everybody before the trial is called failed.
LIMIT = 60.0


class JoinWatch:
    """When each peer first reported ``subject`` as joined, read from the simulation's events."""

    def __init__(self, sim: Simulation, subject: str) -> None:
        self.sim = sim
        self.subject = subject
        self.seen: dict[str, float] = {}
        self._read = len(sim.events)

    def count(self) -> int:
        events = self.sim.events
        for ev in events[self._read :]:
            if ev["kind"] == "joined" and ev["subject"] == self.subject:
                self.seen.setdefault(ev["at"], ev["t"])
        self._read = len(events)
        return len(self.seen)


def trial(n: int, cfg: SwimConfig, seed: int, drop: float) -> dict[str, Any]:
    sim = Simulation(cfg, seed=seed, net=NetConfig(drop=drop))
    names = sim.add_converged(n)
    sim.run_for(WARMUP / 2)
    msgs0, bytes0, t0 = sim.sent_total, sim.bytes_total, sim.now
    sim.run_for(WARMUP / 2)
    background = (sim.sent_total - msgs0) / n / (sim.now - t0)
    background_bytes = (sim.bytes_total - bytes0) / n / (sim.now - t0)

    msgs1, bytes1, joined_at = sim.sent_total, sim.bytes_total, sim.now
    watch = JoinWatch(sim, sim.add(seeds=[names[seed % n]]))
    need = math.ceil(0.999 * n)
    if not sim.run_until(lambda: watch.count() >= need, LIMIT, step=0.01):
        raise RuntimeError(f"N={n} seed={seed}: the join reached {watch.count()} of {n}")
    t999 = sorted(watch.seen.values())[need - 1] - joined_at
    window = max(sim.now - joined_at, 1e-9)
    during = (sim.sent_total - msgs1) / (n + 1) / window
    during_bytes = (sim.bytes_total - bytes1) / (n + 1) / window
    sim.run_until(lambda: watch.count() >= n, LIMIT, step=0.05)
    t_all = max(watch.seen.values()) - joined_at if watch.count() >= n else math.inf
    return {
        "t999_s": t999,
        "t_all_s": t_all,
        "msgs_per_s_per_peer_background": background,
        "bytes_per_s_per_peer_background": background_bytes,
        "msgs_per_s_per_peer_during": during,
        "bytes_per_s_per_peer_during": during_bytes,
    }


def detection(n: int, cfg: SwimConfig, seed: int, drop: float) -> dict[str, Any]:
    """Kill one of ``n`` converged peers; simulated seconds until all survivors hold it dead."""
    sim = Simulation(cfg, seed=seed, net=NetConfig(drop=drop))
    names = sim.add_converged(n)
    sim.run_for(WARMUP + (seed % 10) * 0.1)  # the kill lands at a different phase each time
    victim = names[seed % n]
    sim.kill(victim)
    killed_at = sim.now
    if not sim.run_until(lambda: sim.agree(victim, State.DEAD), LIMIT * 4, step=0.01):
        raise RuntimeError(f"N={n} seed={seed}: {victim} not dead everywhere")
    detected = sim.now - killed_at
    sim.run_for(30.0)
    return {"detect_s": detected, "false_deaths": len(sim.false_deaths)}


def run_size(n: int, cfg: SwimConfig, trials: int, drop: float) -> dict[str, Any]:
    started = time.perf_counter()
    runs = [trial(n, cfg, seed, drop) for seed in range(trials)]
    kills = [detection(n, cfg, seed, drop) for seed in range(trials)]
    t999 = [r["t999_s"] for r in runs]
    detect = sorted(k["detect_s"] for k in kills)
    summary: dict[str, Any] = {
        "n": n,
        "trials": trials,
        "t999_median_s": statistics.median(t999),
        "t999_worst_s": max(t999),
        "t_all_median_s": statistics.median(r["t_all_s"] for r in runs),
        "serf_model_s": SERF_MODEL.get(n),
        "detect_median_s": statistics.median(detect),
        "detect_worst_s": detect[-1],
        "false_deaths": sum(k["false_deaths"] for k in kills),
        "wall_s": time.perf_counter() - started,
    }
    for key in runs[0]:
        if key.startswith(("msgs", "bytes")):
            summary[key] = statistics.median(r[key] for r in runs)
    summary["runs"] = runs
    summary["kills"] = kills
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="group sizes N, comma-separated")
    parser.add_argument("--trials", type=int, default=5, help="seeds per size (default 5)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    parser.add_argument("--drop", type=float, default=0.0, help="message loss probability")
    parser.add_argument("--quick", action="store_true", help="sizes 10,100, 2 trials")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    sizes = [10, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    trials = 2 if args.quick else args.trials
    cfg = PROFILES[args.profile]()
    results = [run_size(n, cfg, trials, args.drop) for n in sizes]

    rows = [
        [
            r["n"],
            r["t999_median_s"],
            r["t999_worst_s"],
            r["t_all_median_s"],
            "-" if r["serf_model_s"] is None else r["serf_model_s"],
            r["msgs_per_s_per_peer_background"],
            r["msgs_per_s_per_peer_during"],
            r["bytes_per_s_per_peer_during"],
        ]
        for r in results
    ]
    detect_rows = [
        [r["n"], r["trials"], r["detect_median_s"], r["detect_worst_s"], r["false_deaths"]]
        for r in results
    ]
    headers = [
        "N",
        "99.9% aware, s (median)",
        "99.9%, worst",
        "100%, s (median)",
        "Serf model, s",
        "msgs/s/peer steady",
        "msgs/s/peer during join",
        "bytes/s/peer during join",
    ]
    detect_headers = ["N", "kills", "all survivors know, s (median)", "worst", "false deaths"]
    result = {
        "benchmark": "swim_dissemination",
        "command": command_line(),
        "machine": machine_info(),
        "profile": args.profile,
        "config": cfg.__dict__,
        "drop": args.drop,
        "results": results,
    }
    tables = [markdown_table(headers, rows), markdown_table(detect_headers, detect_rows)]
    emit(result, tables, args.json)


if __name__ == "__main__":
    main()
