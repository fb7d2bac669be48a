"""Target: kill a random peer every 20 s over a 3-minute run with --restart-failed.

Every peer must finish, and no restarted peer may finish more than 0.5 percentage points
behind (behind the peers that were never restarted, and behind the same peer in a no-fault
run with the same seed; both are reported). The chaos run's invariants (trainer/report.py:
every finished peer within epsilon of the consensus, only finite weights and losses, every
checkpoint loads) must hold as well. The exit status is 1 when any of these checks fails;
the verdict table and stderr say which one, and why.

Runs ``gossip-train local --restart-failed`` (peers in network namespaces with ``--net netns``,
the default when the machine allows it; on loopback with ``--net loopback``): a no-fault
baseline, then examples/scenarios/kill-every-20s.toml (seed 20: a kill every 20 s from
t = 20 s to t = 160 s, the victim drawn at random) with the same seed and flags. The peers
checkpoint every ``--checkpoint-seconds``; a killed peer is started again by the launcher
after 1 s and resumes from its newest checkpoint. ``--epochs`` is chosen so that training
lasts about three minutes on a 2-core machine.

``--quick`` trains on the bundled data set, and kills a random peer at 1/5, 2/5 and 3/5 of
the time the baseline's peers all trained together: like the scenario file, it leaves the
last stretch of training fault-free. (A fixed schedule, kills every 10 s up to t = 40 s,
outlasted the ~20 s of quick training: its last kill came after the other peers had stopped
training, and that victim ended 0.09 from the consensus, failing the epsilon invariant.)

Run: .venv/bin/python benchmarks/kill_restart.py [--quick] [--peers 4] [--epochs 120]
     [--data ../shared/data/mnist] [--net netns|loopback] [--chaos-seed N] [--keep DIR]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import DEFAULT_MNIST, REPO, command_line, emit, machine_info, markdown_table
from partition_heal import accuracy_deltas, base_flags, default_net, run_local

log = logging.getLogger(__name__)

SCENARIO = REPO / "examples" / "scenarios" / "kill-every-20s.toml"
BEHIND_PP = 0.5
# --quick kills at these fractions of the baseline's time with every peer training.
QUICK_KILLS = (0.2, 0.4, 0.6)


def flags(args: argparse.Namespace) -> list[str]:
    out = [*base_flags(args), "--restart-failed"]
    out += ["--checkpoint-seconds", str(args.checkpoint_seconds)]
    if args.net == "netns":
        out += ["--netns"]
    return out


def peer_rows(run: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    acc = {p["name"]: p for p in run["report"]["quality"]["peers"]}
    base_acc = {p["name"]: p["test_accuracy"] for p in base["peers"]}
    rows = []
    for p in run["summary"]["peers"]:
        a = acc[p["name"]]
        b = base_acc.get(p["name"])
        rows.append(
            {
                "peer": p["name"],
                "status": p["status"],
                "restarts": p["restarts"],
                "accuracy": p["test_accuracy"],
                "baseline": b,
                "delta_vs_baseline_pp": a["delta"],
                "behind_unrestarted_pp": a["behind_unrestarted"],
            }
        )
    return rows


def kill_rows(report: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    ends = training_ends(summary)
    rows = []
    for f in report["faults"]:
        if f["fault"] != "kill":
            continue
        others = [t for name, t in ends.items() if name not in f["peers"]]
        rows.append(
            {
                "t": f["t"],
                "peer": ",".join(f["peers"]),
                "skipped": f.get("skipped"),
                "detected_s": f.get("detected_s"),
                "declared_dead_s": f.get("declared_dead_s"),
                "others_longest_gap_s": f.get("stall", {}).get("longest_gap_s"),
                # Other peers whose training (their last life's) had not ended at the kill.
                "others_training": sum(1 for t in others if t > f["t"]),
            }
        )
    return rows


def training_ends(summary: dict[str, Any]) -> dict[str, float]:
    """Launcher time at which each peer stopped training for good (when its last linger
    began; a peer that did not linger: its finish)."""
    ends: dict[str, float] = {}
    finished: dict[str, float] = {}
    for e in sorted(summary["events"], key=lambda e: e["t"]):
        if e["kind"] == "lingered":
            ends[e["peer"]] = round(e["t"] - e.get("seconds", 0.0), 3)
        elif e["kind"] == "finished":
            finished[e["peer"]] = e["t"]
    return {name: ends.get(name, t) for name, t in finished.items()}


def trained_together(summary: dict[str, Any]) -> float | None:
    """Seconds during which every peer trained: from the last first start to the first end."""
    starts: dict[str, float] = {}
    for e in summary["events"]:
        if e["kind"] == "started":
            starts[e["peer"]] = min(e["t"], starts.get(e["peer"], e["t"]))
    ends = training_ends(summary)
    if not starts or not ends:
        return None
    return round(min(ends.values()) - max(starts.values()), 1)


def quick_schedule(base_summary: dict[str, Any]) -> list[str]:
    """Kills at QUICK_KILLS of the baseline's time with every peer training (the chaos clock
    starts when every peer trains), so the last stretch of training stays fault-free."""
    together = trained_together(base_summary) or 20.0
    every = max(1.0, round(together * QUICK_KILLS[0], 1))
    until = round(every * (len(QUICK_KILLS) + 0.5), 1)
    return ["--random", f"kind=kill every={every} start={every} until={until}"]


def verdict(
    peers: list[dict[str, Any]], kills: list[dict[str, Any]], report: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each check: whether it was met and, when it was not, which peer or file and why."""
    restarted = [r for r in peers if r["restarts"]]
    last_kill = {k["peer"]: k for k in kills if not k["skipped"]}
    unfinished = [f"{r['peer']} {r['status']}" for r in peers if r["status"] != "finished"]
    behind = [
        f"{r['peer']} {r['behind_unrestarted_pp']} pp behind the never-restarted peers"
        for r in restarted
        if (r["behind_unrestarted_pp"] or 0) > BEHIND_PP
    ]
    below = [
        f"{r['peer']} {r['delta_vs_baseline_pp']} pp against its no-fault run"
        for r in restarted
        if (r["delta_vs_baseline_pp"] or 0) < -BEHIND_PP
    ]
    inv = report["invariants"]
    broken = []
    conv = inv["converged"]
    if not conv["ok"]:
        far = {n: d for n, d in conv["relative_distance"].items() if d > conv["epsilon"]}
        for name, dist in far.items():
            why = f"{name} ended {dist} from the consensus (relative L2, epsilon {conv['epsilon']})"
            k = last_kill.get(name)
            if k is not None and k["others_training"] == 0:
                why += (
                    f"; it was last killed at t = {k['t']:.1f} s, when no other peer was "
                    "still training, so after its restart it may have had no one left to "
                    "average with"
                )
            broken.append(why)
        if not far:
            broken.append(f"converged: {conv['peers']} finished peers, no distance measured")
    if not inv["checkpoints_load"]["ok"]:
        broken.append(f"checkpoints that do not load: {inv['checkpoints_load']['failed']}")
    fin = inv["finite"]
    if not fin["ok"]:
        broken.append(
            "non-finite weights or losses: "
            + ", ".join(f"{k}={v}" for k, v in fin.items() if k != "ok")
        )
    if not report["invariants_ok"] and not broken:
        broken.append(f"invariants_ok is false: {sorted(inv)}")
    checks = [
        ("every_peer_finished", unfinished),
        ("restarted_within_0.5pp_of_unrestarted", behind),
        ("restarted_within_0.5pp_of_baseline", below),
        ("invariants", broken),
    ]
    return [{"check": c, "met": not why, "why": "; ".join(why)} for c, why in checks]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bundled data, ~1 minute, kill every 10 s")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--epochs", type=float, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-seconds", type=float, default=5.0)
    p.add_argument("--chaos-seed", type=int, help="another draw of victims (default: file's 20)")
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--net", choices=("netns", "loopback"), default=None)
    p.add_argument("--keep", type=Path, help="keep the run folders here")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.net = args.net or ("netns" if default_net() == "netns" else "loopback")
    chaos = ["--chaos", str(SCENARIO)]
    if args.quick:
        args.data, args.epochs = None, 120
    work = args.keep or Path(tempfile.mkdtemp(prefix="kill-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    try:
        base = run_local(flags(args), work / "baseline", 1800)
        if args.quick:
            chaos = quick_schedule(base["summary"])
        if args.chaos_seed is not None:
            chaos += ["--chaos-seed", str(args.chaos_seed)]
        run = run_local(
            [*flags(args), *chaos, "--baseline", str(work / "baseline")], work / "chaos", 1800
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    peers = peer_rows(run, base["summary"])
    kills = kill_rows(run["report"], run["summary"])
    checks = verdict(peers, kills, run["report"])
    detected = [k["detected_s"] for k in kills if k["detected_s"] is not None]
    result = {
        "benchmark": "kill_restart",
        "command": command_line(),
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "network_mode": args.net,
        "peers": args.peers,
        "epochs": args.epochs,
        "dataset": "default" if args.data is None else "mnist",
        "scenario": chaos,
        "chaos_seed": run["summary"]["chaos"]["seed"],
        "baseline_wall_s": base["wall_s"],
        "chaos_wall_s": run["wall_s"],
        "training_span_s": training_span(run["summary"]),
        "kills": kills,
        "detection_median_s": statistics.median(detected) if detected else None,
        "peer_results": peers,
        "consensus": accuracy_deltas(run["summary"], base["summary"]),
        "invariants": run["report"]["invariants"],
        "baseline_trained_together_s": trained_together(base["summary"]),
        "targets_met": {c["check"]: c["met"] for c in checks},
        "verdict": checks,
    }
    tables = [
        markdown_table(
            [
                "peer",
                "status",
                "restarts",
                "accuracy",
                "baseline",
                "delta (pp)",
                "behind unrestarted (pp)",
            ],
            [
                [
                    r["peer"],
                    r["status"],
                    r["restarts"],
                    r["accuracy"],
                    r["baseline"],
                    r["delta_vs_baseline_pp"],
                    r["behind_unrestarted_pp"],
                ]
                for r in peers
            ],
        ),
        markdown_table(
            [
                "t (s)",
                "killed",
                "detected (s)",
                "declared dead (s)",
                "others' longest gap (s)",
                "others still training",
            ],
            [
                [
                    k["t"],
                    k["peer"] + (f" ({k['skipped']})" if k["skipped"] else ""),
                    k["detected_s"],
                    k["declared_dead_s"],
                    k["others_longest_gap_s"],
                    k["others_training"],
                ]
                for k in kills
            ],
        ),
        markdown_table(
            ["check", "met", "why not"],
            [[c["check"], "yes" if c["met"] else "NO", c["why"]] for c in checks],
        ),
    ]
    emit(result, tables, args.json)
    missed = [c for c in checks if not c["met"]]
    for c in missed:
        log.error("target missed: %s: %s", c["check"], c["why"])
    if not missed:
        log.info("all targets met")
    return 1 if missed else 0


def training_span(summary: dict[str, Any]) -> float | None:
    """Seconds from the first peer's start of training to the last peer's finish."""
    starts = [e["t"] for e in summary["events"] if e["kind"] == "started"]
    ends = [e["t"] for e in summary["events"] if e["kind"] == "finished"]
    return round(max(ends) - min(starts), 1) if starts and ends else None


if __name__ == "__main__":
    sys.exit(main())
