"""Target: a 50/50 partition for 30 s, then heal.

Membership must be whole again within 10 s of the heal, and the final accuracy must be within
0.5 percentage points of a no-fault run with the same seed.

Runs ``gossip-train local`` (each peer in its own network namespace with ``--net netns``, the
default when the machine allows it; the TCP proxy with ``--net proxy``): first a no-fault
baseline, then ``--trials`` runs of examples/scenarios/partition-heal.toml (peers
{0, 1} | {2, 3} from t = 20 s to t = 50 s after every peer started training), each with the
same seed and flags as the baseline, and a second no-fault run (``--noise``) that shows how
far two fault-free runs of the same seed land apart. The numbers come from each run's
report.json (trainer/report.py): whole = seconds from the heal until every live peer sees
every other alive again, from the peers' own membership events.

Run: .venv/bin/python benchmarks/partition_heal.py [--quick] [--trials 3] [--peers 4]
     [--epochs 50] [--data ../shared/data/mnist] [--net netns|proxy] [--keep DIR]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_MNIST,
    REPO,
    command_line,
    emit,
    launch_local,
    machine_info,
    markdown_table,
    read_summary,
)

log = logging.getLogger(__name__)

SCENARIO = REPO / "examples" / "scenarios" / "partition-heal.toml"
# Targets of the issue.
WHOLE_WITHIN_S = 10.0
ACCURACY_WITHIN_PP = 0.5


def default_net() -> str:
    sys.path.insert(0, str(REPO))
    from trainer.chaos.netns import netns_available

    return "netns" if netns_available()[0] else "proxy"


def run_local(argv: Sequence[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    """One ``gossip-train local`` run (``common.launch_local``; its output in RUN_DIR.out):
    its summary, its report (when written) and its wall time."""
    run = launch_local(run_dir, argv, timeout)
    return {"summary": run.summary, "report": run.report(), "wall_s": round(run.exit_s, 1)}


def accuracy_deltas(summary: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Consensus and per-peer accuracy differences in percentage points (run - baseline)."""
    cons = 100 * (summary["consensus_test_accuracy"] - base["consensus_test_accuracy"])
    by_name = {p["name"]: p["test_accuracy"] for p in base["peers"]}
    peers = [
        100 * (p["test_accuracy"] - by_name[p["name"]])
        for p in summary["peers"]
        if p["test_accuracy"] is not None and by_name.get(p["name"]) is not None
    ]
    return {
        "consensus_pp": round(cons, 3),
        "worst_peer_pp": round(max(peers, key=abs), 3) if peers else None,
        "consensus": summary["consensus_test_accuracy"],
    }


def base_flags(args: argparse.Namespace) -> list[str]:
    """`gossip-train local` flags every chaos benchmark's runs share."""
    flags = ["--peers", str(args.peers), "--epochs", str(args.epochs), "--seed", str(args.seed)]
    flags += ["--linger", "10", "--timeout", "1800"]
    if args.data:
        flags += ["--dataset", "mnist", "--data-dir", str(args.data)]
    return flags


def train_flags(args: argparse.Namespace) -> list[str]:
    flags = base_flags(args)
    flags += ["--netns"] if args.net == "netns" else ["--proxy"]
    for setting in args.sysctl or []:
        flags += ["--netns-sysctl", setting]
    return flags


def trial_row(k: int, run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    report = run["report"]
    rows = {f["fault"]: f for f in report["faults"]}
    part, heal = rows.get("partition", {}), rows.get("heal", {})
    acc = accuracy_deltas(run["summary"], base)
    return {
        "trial": k,
        "detected_s": part.get("detected_s"),
        "split_s": part.get("split_s"),
        "whole_after_heal_s": heal.get("whole_s"),
        "consensus_delta_pp": acc["consensus_pp"],
        "worst_peer_delta_pp": acc["worst_peer_pp"],
        "consensus_accuracy": acc["consensus"],
        "invariants_ok": report["invariants_ok"],
        "all_finished": all(p["status"] == "finished" for p in run["summary"]["peers"]),
        "wall_s": run["wall_s"],
    }


def verdict(rows: list[dict[str, Any]]) -> dict[str, bool]:
    return {
        "whole_within_10s": all(
            r["whole_after_heal_s"] is not None and r["whole_after_heal_s"] <= WHOLE_WITHIN_S
            for r in rows
        ),
        "accuracy_within_0.5pp": all(
            abs(r["consensus_delta_pp"]) <= ACCURACY_WITHIN_PP for r in rows
        ),
        "invariants": all(r["invariants_ok"] and r["all_finished"] for r in rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bundled data, short run, 5 s cut")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--epochs", type=float, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--net", choices=("netns", "proxy"), default=None)
    p.add_argument("--no-noise", action="store_true", help="skip the second no-fault run")
    p.add_argument(
        "--sysctl", action="append", metavar="KEY=VALUE", help="per-host kernel setting (netns)"
    )
    p.add_argument(
        "--reuse-baseline", type=Path, metavar="DIR", help="an earlier baseline run (same flags)"
    )
    p.add_argument("--keep", type=Path, help="keep the run folders here")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.net = args.net or default_net()
    chaos = ["--chaos", str(SCENARIO)]
    if args.quick:
        args.data, args.epochs, args.trials = None, 40, 1
        chaos = ["--fault", "at=5 kind=partition groups=0,1/2,3 for=5"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="partition-heal-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    try:
        flags = train_flags(args)
        base_dir = args.reuse_baseline or work / "baseline"
        if args.reuse_baseline:
            base = {"summary": read_summary(base_dir), "wall_s": None}
        else:
            base = run_local(flags, base_dir, 1800)
        rows = []
        for k in range(args.trials):
            run_dir = work / f"trial-{k}"
            run = run_local([*flags, *chaos, "--baseline", str(base_dir)], run_dir, 1800)
            rows.append(trial_row(k, run, base["summary"]))
            log.info("trial %d: %s", k, rows[-1])
        noise = None
        if not args.no_noise and not args.quick:
            again = run_local(flags, work / "baseline-again", 1800)
            noise = accuracy_deltas(again["summary"], base["summary"])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "partition_heal",
        "command": command_line(),
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg())},
        "network_mode": args.net,
        "peers": args.peers,
        "epochs": args.epochs,
        "dataset": "default" if args.data is None else "mnist",
        "scenario": chaos,
        "baseline_consensus_accuracy": base["summary"]["consensus_test_accuracy"],
        "baseline_wall_s": base["wall_s"],
        "no_fault_rerun_delta": noise,
        "trials": rows,
        "targets_met": verdict(rows),
    }
    headers = [
        "trial",
        "detected (s)",
        "split (s)",
        "whole after heal (s)",
        "consensus delta (pp)",
        "worst peer delta (pp)",
        "invariants",
        "wall (s)",
    ]
    table = markdown_table(
        headers,
        [
            [
                r["trial"],
                r["detected_s"],
                r["split_s"],
                r["whole_after_heal_s"],
                r["consensus_delta_pp"],
                r["worst_peer_delta_pp"],
                r["invariants_ok"],
                r["wall_s"],
            ]
            for r in rows
        ],
    )
    emit(result, [table], args.json)
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
