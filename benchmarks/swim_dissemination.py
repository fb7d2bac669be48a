"""How fast SWIM spreads a join, in the discrete-event simulator (p2p.simulation).

For each group size N: N peers that already know each other run for a warm-up on a
simulated LAN (0.5-1.5 ms one-way, ``--drop`` loss); then one new peer joins through one of
them. Measured in *simulated* seconds from the join request until ceil(0.999 N) of the N
have reported the newcomer (their "joined" event), and until all N have. Also the messages
and msgpack bytes each peer sent per simulated second: in the steady state before the join,
and from the join until 99.9% knew. Then, in a second group of N, one peer is killed: the
time until every survivor holds it dead, and how many false deaths happened on the way.
With ``--stalls``, the freeze a peer survives: one of ``--stall-peers`` peers stops (like
SIGSTOP, or a stalled event loop) for each given number of seconds; how often it was
declared dead by anyone.

The reference is Serf's convergence model (hashicorp.com/serf, "Gossip Protocol"): with a
200 ms gossip interval and fanout 3, 99.9% of 100 nodes know in 1.54 s and of 1000 in
1.84 s; the lan() profile has the same interval and fanout. Wall time depends on the
machine; the simulated times do not.

    .venv/bin/python benchmarks/swim_dissemination.py [--quick] [--sizes 10,100,1000]
        [--trials 3] [--profile lan] [--drop 0.0] [--suspicion-mult M]
        [--stalls 1.5,2,2.5,3 --stall-peers 8 --stall-trials 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from common import command_line, emit, machine_info, markdown_table

from p2p.simulation import NetConfig, Simulation
from p2p.swim import SwimConfig

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


class Watch:
    """When each peer first reported ``kind`` about ``subject``, read from the events."""

    def __init__(self, sim: Simulation, kind: str, subject: str) -> None:
        self.sim = sim
        self.kind = kind
        self.subject = subject
        self.seen: dict[str, float] = {}
        self._read = len(sim.events)

    def count(self) -> int:
        events = self.sim.events
        for ev in events[self._read :]:
            if ev["kind"] == self.kind and ev["subject"] == self.subject:
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
    watch = Watch(sim, "joined", sim.add(seeds=[names[seed % n]]))
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
    watch = Watch(sim, "declared_dead", victim)
    if not sim.run_until(lambda: watch.count() >= n - 1, LIMIT * 4, step=0.05):
        raise RuntimeError(f"N={n} seed={seed}: {victim} not dead everywhere")
    detected = max(watch.seen.values()) - killed_at
    sim.run_for(10.0)
    return {"detect_s": detected, "false_deaths": len(sim.false_deaths)}


def stall(n: int, cfg: SwimConfig, seconds: float, seed: int) -> bool:
    """One of ``n`` peers freezes for ``seconds``; True if anyone declared it dead."""
    sim = Simulation(cfg, seed=seed, net=NetConfig(delay=0.001, jitter=0.01))
    names = sim.add_converged(n)
    sim.run_for(WARMUP + (seed % 10) * 0.037)
    frozen = names[seed % n]
    sim.pause(frozen)
    sim.run_for(seconds)
    sim.resume(frozen)
    sim.run_for(10.0)
    if not sim.converged():
        raise RuntimeError(f"stall {seconds} s seed={seed}: no convergence after resume")
    return any(e["kind"] == "declared_dead" and e["subject"] == frozen for e in sim.events)


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
    parser.add_argument(
        "--sizes", default="10,100,1000", help="group sizes N, comma-separated (0: none)"
    )
    parser.add_argument("--trials", type=int, default=3, help="seeds per size (default 3)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    parser.add_argument("--drop", type=float, default=0.0, help="message loss probability")
    parser.add_argument("--suspicion-mult", type=int, help="override the profile's")
    parser.add_argument("--stalls", default="", help="freeze lengths in s, comma-separated")
    parser.add_argument("--stall-peers", type=int, default=8, help="group size for --stalls")
    parser.add_argument("--stall-trials", type=int, default=40, help="seeds per freeze length")
    parser.add_argument("--quick", action="store_true", help="sizes 10,100, 2 trials")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    sizes = [10, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    trials = 2 if args.quick else args.trials
    cfg = PROFILES[args.profile]()
    if args.suspicion_mult:
        cfg = dataclasses.replace(cfg, suspicion_mult=args.suspicion_mult)
    results = [run_size(n, cfg, trials, args.drop) for n in sizes if n > 0]
    stalls = []
    for seconds in [float(x) for x in args.stalls.split(",") if x]:
        died = sum(stall(args.stall_peers, cfg, seconds, seed) for seed in range(args.stall_trials))
        stalls.append({"freeze_s": seconds, "trials": args.stall_trials, "declared_dead": died})

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
        "stalls": stalls,
    }
    tables = []
    if results:
        tables += [markdown_table(headers, rows), markdown_table(detect_headers, detect_rows)]
    if stalls:
        stall_rows = [[s["freeze_s"], s["trials"], s["declared_dead"]] for s in stalls]
        heads = ["freeze, s", f"trials ({args.stall_peers} peers)", "declared dead"]
        tables.append(markdown_table(heads, stall_rows))
    emit(result, tables, args.json)


if __name__ == "__main__":
    main()
