"""Target: kill a random peer every 20 s over a 3-minute run with --restart-failed.

Every peer must finish, and no restarted peer may finish more than 0.5 percentage points
behind (behind the peers that were never restarted, and behind the same peer in a no-fault
run with the same seed; both are reported).

Runs ``gossip-train local --restart-failed`` (peers in network namespaces with ``--net netns``,
the default when the machine allows it; on loopback with ``--net loopback``): a no-fault
baseline, then examples/scenarios/kill-every-20s.toml (seed 20: a kill every 20 s from
t = 20 s to t = 160 s, the victim drawn at random) with the same seed and flags. The peers
checkpoint every ``--checkpoint-seconds``; a killed peer is started again by the launcher
after 1 s and resumes from its newest checkpoint. ``--epochs`` is chosen so that training
lasts about three minutes on a 2-core machine.

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
from partition_heal import accuracy_deltas, default_net, run_local

log = logging.getLogger(__name__)

SCENARIO = REPO / "examples" / "scenarios" / "kill-every-20s.toml"
BEHIND_PP = 0.5


def flags(args: argparse.Namespace) -> list[str]:
    out = [
        "--peers",
        str(args.peers),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--linger",
        "10",
        "--restart-failed",
        "--checkpoint-seconds",
        str(args.checkpoint_seconds),
        "--timeout",
        "1800",
    ]
    if args.data:
        out += ["--dataset", "mnist", "--data-dir", str(args.data)]
    if args.net == "netns":
        out += ["--netns"]
    return out


def peer_rows(run: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    acc = {p["name"]: p for p in run["report"]["accuracy"]["peers"]}
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
                "delta_vs_baseline_pp": a["delta_pp"],
                "behind_unrestarted_pp": a["behind_unrestarted_pp"],
            }
        )
    return rows


def kill_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "t": f["t"],
            "peer": ",".join(f["peers"]),
            "skipped": f.get("skipped"),
            "detected_s": f.get("detected_s"),
            "declared_dead_s": f.get("declared_dead_s"),
            "others_longest_gap_s": f.get("stall", {}).get("longest_gap_s"),
        }
        for f in report["faults"]
        if f["fault"] == "kill"
    ]


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
        chaos = ["--random", "kind=kill every=10 start=5 until=40"]
    if args.chaos_seed is not None:
        chaos += ["--chaos-seed", str(args.chaos_seed)]
    work = args.keep or Path(tempfile.mkdtemp(prefix="kill-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    try:
        base = run_local(flags(args), work / "baseline", 1800)
        run = run_local(
            [*flags(args), *chaos, "--baseline", str(work / "baseline")], work / "chaos", 1800
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    peers = peer_rows(run, base["summary"])
    kills = kill_rows(run["report"])
    restarted = [r for r in peers if r["restarts"]]
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
        "targets_met": {
            "every_peer_finished": all(r["status"] == "finished" for r in peers),
            "restarted_within_0.5pp_of_unrestarted": all(
                (r["behind_unrestarted_pp"] or 0) <= BEHIND_PP for r in restarted
            ),
            "restarted_within_0.5pp_of_baseline": all(
                (r["delta_vs_baseline_pp"] or 0) >= -BEHIND_PP for r in restarted
            ),
            "invariants": run["report"]["invariants_ok"],
        },
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
            ["t (s)", "killed", "detected (s)", "declared dead (s)", "others' longest gap (s)"],
            [
                [
                    k["t"],
                    k["peer"] + (f" ({k['skipped']})" if k["skipped"] else ""),
                    k["detected_s"],
                    k["declared_dead_s"],
                    k["others_longest_gap_s"],
                ]
                for k in kills
            ],
        ),
    ]
    emit(result, tables, args.json)
    return 0 if all(result["targets_met"].values()) else 1


def training_span(summary: dict[str, Any]) -> float | None:
    """Seconds from the first peer's start of training to the last peer's finish."""
    starts = [e["t"] for e in summary["events"] if e["kind"] == "started"]
    ends = [e["t"] for e in summary["events"] if e["kind"] == "finished"]
    return round(max(ends) - min(starts), 1) if starts and ends else None


if __name__ == "__main__":
    sys.exit(main())
