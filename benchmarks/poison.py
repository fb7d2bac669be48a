"""Robust mixing under poisoning: what a hostile member does to the honest peers, and what
robust mixing costs when there is none.

Every run is the real command, ``gossip-train local`` (``common.launch_local``), the seed
MLP, batch 32, Adam 1e-3, seed 0, one torch thread per peer. A poisoner is a peer the chaos
tool turns hostile from the moment every peer trains (``--fault 'at=0 kind=poison
peer=P mode=M'``): after every step its weights are the poison, and it mixes nothing in.
Robust mixing is turned off for a comparison with ``--config`` of a file holding
``[gossip.robust] enabled = false``.

- **a**: 5 peers, ``--epochs`` local epochs of MNIST (iid), one poisoner (peer-4) in each
  mode (zero, negate, noise, scale) and a no-fault run; also ``--off-modes`` (zero) with
  robust mixing off (the threat). Target: the 4 honest peers within 1 pp of the no-fault
  run.
- **b**: 7 peers, two poisoners (peer-5, peer-6) in each mode, and the 7-peer no-fault run.
- **c**: no attacker, Dirichlet(0.5) label skew, 4 peers, MNIST and Fashion-MNIST, robust
  mixing on and off, interleaved ``--c-reps`` times: refused and quarantined honest updates
  (target 0), the largest accepted update over the median, and accuracy.
- **d**: no attacker, 4 peers, MNIST iid: time from launch (and from the last peer's start)
  until every peer has reported ``--target`` test accuracy (evaluating 4 times per local
  epoch), and the step at which the last did, robust mixing on and off, interleaved rep by
  rep; the paired ratio on/off (target at most 1.05); and the CPU robust mixing adds to
  each received vector, measured in process.

    .venv/bin/python benchmarks/poison.py                       # a, b, c, d
    .venv/bin/python benchmarks/poison.py --only a,c --keep /tmp/poison
    .venv/bin/python benchmarks/poison.py --quick               # smoke: bundled data set
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_MNIST,
    REPO,
    Launch,
    Runs,
    command_line,
    emit,
    fmt,
    launch_local,
    load_now,
    machine_info,
    markdown_table,
    median,
)

from gossip.averaging import DeltaStream
from trainer.chaos.report import poisoning

log = logging.getLogger(__name__)

MODES = ("zero", "negate", "noise", "scale")
DEFAULT_FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
TRAIN_SIZE = {"mnist": 60_000, "fashion-mnist": 60_000, "default": 12_000}
OFF = "[gossip.robust]\nenabled = false\n"


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.runs = Runs(root)
        self.off = root / "robust-off.toml"
        self.off.write_text(OFF)

    def data(self, dataset: str) -> list[str]:
        if self.args.quick:
            return ["--dataset", "default"]
        folder = self.args.fashion_dir if dataset == "fashion-mnist" else self.args.data_dir
        return ["--dataset", dataset, "--data-dir", str(folder)]

    def run(
        self,
        label: str,
        peers: int,
        *,
        poisoners: Sequence[int] = (),
        mode: str | None = None,
        robust: bool = True,
        dataset: str = "mnist",
        partition: str = "iid",
        epochs: float | None = None,
        eval_every: int = 0,
    ) -> dict[str, Any]:
        epochs = self.args.epochs if epochs is None else epochs
        argv = ["--peers", str(peers), "--epochs", str(epochs), "--threads", "1"]
        argv += [*self.data(dataset), "--partition", partition, "--seed", "0"]
        argv += ["--linger", str(self.args.linger)]
        if eval_every:
            argv += ["--eval-every", str(eval_every)]
        for p in poisoners:
            argv += ["--fault", f"at=0 kind=poison peer=peer-{p} mode={mode}"]
        if not robust:
            argv += ["--config", str(self.off)]
        load = load_now()
        launch = launch_local(self.runs.next(label), argv, self.args.timeout)
        return describe(launch, label, robust, mode, [load, load_now()])


def describe(
    run: Launch, label: str, robust: bool, mode: str | None, load: list[float]
) -> dict[str, Any]:
    """What one run did: the honest peers' accuracy, the refusals and quarantines."""
    p = poisoning(run.summary)
    peers = {r["name"]: r for r in p["peers"]}
    hostile = [n for n, r in peers.items() if r["poisoned"]]
    quarantined = p["quarantines"]
    return {
        "label": label,
        "robust": robust,
        "mode": mode,
        "poisoners": hostile,
        "honest_min": p["honest_min"],
        "honest_mean": p["honest_mean"],
        "accuracy": {n: r["value"] for n, r in peers.items()},
        "consensus": run.summary.get("consensus_test_accuracy"),
        "refused_honest": p["honest_refused"],
        "refused_hostile": sum(c["refused"] for s, c in p["by_subject"].items() if s in hostile),
        "quarantined_honest": p["honest_quarantined"],
        "quarantined_hostile": sum(1 for q in quarantined if not q["honest_subject"]),
        "first_quarantine_s": min((q["t"] for q in quarantined), default=None),
        "clipped": sum(r["clipped"] or 0 for n, r in peers.items() if n not in hostile),
        "accepted": sum(r["accepted"] or 0 for n, r in peers.items() if n not in hostile),
        "largest_ratio": max(
            (r["largest_ratio"] or 0.0 for n, r in peers.items() if n not in hostile),
            default=None,
        ),
        "wall_s": round(run.exit_s, 1),
        "load_1m": [round(x, 2) for x in load],
        "evals": [
            [e["peer"], e["t"] + run.offset, e["accuracy"], e["step"]]
            for e in run.summary["events"]
            if e.get("kind") == "eval"
        ],
        "gossip_cpu_s": sum(
            e.get("gossip_cpu_seconds") or 0.0
            for e in run.summary["events"]
            if e.get("kind") == "finished"
        ),
        "exchanges": sum(p.get("exchanges") or 0 for p in run.summary["peers"]),
        "all_started_s": max(
            (e["t"] + run.offset for e in run.summary["events"] if e.get("kind") == "started"),
            default=None,
        ),
        "run_dir": str(run.run_dir),
    }


def pp(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 2)


def attack_rows(runs: list[dict[str, Any]], base: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in [base, *runs]:
        rows.append(
            [
                r["label"],
                "on" if r["robust"] else "off",
                fmt(r["honest_min"], ".4f"),
                fmt(r["honest_mean"], ".4f"),
                fmt(pp(r["honest_mean"], base["honest_mean"]), "+.2f"),
                fmt(pp(r["honest_min"], base["honest_min"]), "+.2f"),
                r["refused_hostile"],
                r["refused_honest"],
                r["quarantined_hostile"],
                r["quarantined_honest"],
                fmt(r["first_quarantine_s"], ".1f"),
                r["clipped"],
                r["wall_s"],
                "-".join(f"{x:.1f}" for x in r["load_1m"]),
            ]
        )
    return rows


ATTACK_HEADERS = [
    "run",
    "robust",
    "honest min",
    "honest mean",
    "mean vs no-fault (pp)",
    "min vs no-fault (pp)",
    "refused (poison)",
    "refused (honest)",
    "quarantines (poisoner)",
    "quarantines (honest)",
    "first quarantine (s)",
    "clipped (honest peers)",
    "wall (s)",
    "load",
]


def part_a(b: Bench) -> tuple[dict[str, Any], str]:
    base = b.run("a-nofault", 5)
    runs = [b.run(f"a-{m}", 5, poisoners=[4], mode=m) for m in MODES]
    for m in b.args.off_modes.split(","):
        if m:
            runs.append(b.run(f"a-{m}-off", 5, poisoners=[4], mode=m, robust=False))
    table = markdown_table(ATTACK_HEADERS, attack_rows(runs, base))
    return {"no_fault": base, "runs": runs}, "### (a) 5 peers, 1 poisoner\n\n" + table


def part_b(b: Bench) -> tuple[dict[str, Any], str]:
    base = b.run("b-nofault", 7)
    modes = b.args.b_modes.split(",")
    runs = [b.run(f"b-{m}", 7, poisoners=[5, 6], mode=m) for m in modes]
    table = markdown_table(ATTACK_HEADERS, attack_rows(runs, base))
    return {"no_fault": base, "runs": runs}, "### (b) 7 peers, 2 poisoners\n\n" + table


def part_c(b: Bench) -> tuple[dict[str, Any], str]:
    sets = ["default"] if b.args.quick else b.args.c_sets.split(",")
    out: dict[str, Any] = {}
    rows, summary = [], []
    for ds in sets:
        arms: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for k in range(b.args.c_reps):
            order = ("on", "off") if k % 2 == 0 else ("off", "on")
            for arm in order:
                r = b.run(f"c-{ds}-{arm}-{k}", 4, dataset=ds, partition="dirichlet:0.5",
                          robust=arm == "on")  # fmt: skip
                arms[arm].append(r)
                rows.append(
                    [
                        ds,
                        k,
                        arm,
                        r["refused_honest"],
                        r["quarantined_honest"],
                        r["clipped"],
                        r["accepted"],
                        fmt(r["largest_ratio"], ".2f") if r["robust"] else "-",
                        fmt(r["honest_min"], ".4f"),
                        fmt(r["honest_mean"], ".4f"),
                        fmt(r["consensus"], ".4f"),
                        r["wall_s"],
                        "-".join(f"{x:.1f}" for x in r["load_1m"]),
                    ]
                )
        out[ds] = arms
        on = [r["honest_mean"] for r in arms["on"]]
        off = [r["honest_mean"] for r in arms["off"]]
        summary.append(
            [
                ds,
                len(on),
                sum(r["refused_honest"] for r in arms["on"]),
                sum(r["quarantined_honest"] for r in arms["on"]),
                fmt(max((r["largest_ratio"] or 0 for r in arms["on"]), default=None), ".2f"),
                fmt(median(on), ".4f"),
                f"{min(on):.4f}-{max(on):.4f}",
                fmt(median(off), ".4f"),
                f"{min(off):.4f}-{max(off):.4f}",
                fmt(pp(median(on), median(off)), "+.2f"),
            ]
        )
    headers = [
        "data set",
        "rep",
        "robust",
        "refused",
        "quarantines",
        "clipped",
        "accepted",
        "largest / median",
        "min acc",
        "mean acc",
        "consensus",
        "wall (s)",
        "load",
    ]
    sum_headers = [
        "data set",
        "reps",
        "refused (on)",
        "quarantines (on)",
        "largest / median (on)",
        "mean acc on (median)",
        "on range",
        "mean acc off (median)",
        "off range",
        "on - off (pp)",
    ]
    title = "### (c) no attacker, Dirichlet(0.5), 4 peers\n\n"
    table = markdown_table(sum_headers, summary) + "\n\n" + markdown_table(headers, rows)
    return out, title + table


def reach(run: dict[str, Any], target: float, peers: int) -> tuple[float | None, int | None]:
    """Seconds from launch until every peer had reported >= target at least once, and the
    step at which the last of them did."""
    first: dict[str, tuple[float, int]] = {}
    for peer, t, acc, step in sorted(run["evals"], key=lambda e: e[1]):
        if acc >= target and peer not in first:
            first[peer] = (t, step)
    if len(first) < peers:
        return None, None
    t, step = max(first.values())
    return t, step


def screening_cost(sizes: Sequence[int], reps: int = 30) -> list[list[Any]]:
    """CPU of what one exchange does with a received vector after the transfer, in process:
    the delta with its norms (DeltaStream) and the add, without and with robust mixing (the
    remote norm, the anchor's dots, the screen's verdict, the anchor's move). Median of
    ``reps`` runs, milliseconds."""
    import time

    import numpy as np

    from gossip.screening import Screen

    rows = []
    for size in sizes:
        rng = np.random.default_rng(0)
        snap = rng.normal(size=size).astype(np.float32)
        base = (snap + 0.01 * rng.normal(size=size)).astype(np.float32)
        current, anchor, buf = snap.copy(), snap.copy(), np.empty_like(snap)
        screen = Screen()
        times: dict[str, list[float]] = {"plain": [], "robust": []}
        for _ in range(reps):
            for arm in times:
                np.copyto(buf, base)
                t0 = time.thread_time()
                stream = DeltaStream(snap, 0.5, anchor=anchor if arm == "robust" else None)
                delta = stream.finish(buf)
                if arm == "robust":
                    sq = (stream.dist_sq, stream.snap_sq)
                    v = screen.judge("p", *sq, 0.0, remote_sq=stream.remote_sq,
                                     drift_sq=stream.moved_sq)  # fmt: skip
                    if v.scale < 1:
                        delta *= np.float32(v.scale)
                np.add(current, delta, out=current)
                if arm == "robust":
                    np.add(snap, delta, out=anchor)
                times[arm].append(time.thread_time() - t0)
        plain, robust = (1000 * float(np.median(times[a])) for a in ("plain", "robust"))
        rows.append([f"{size:,}", f"{plain:.3f}", f"{robust:.3f}", f"{robust / plain:.2f}"])
    return rows


def part_d(b: Bench) -> tuple[dict[str, Any], str]:
    peers, ds = 4, "default" if b.args.quick else "mnist"
    every = max(1, round(TRAIN_SIZE[ds] / peers / 32 / 4))
    target = 0.85 if b.args.quick else b.args.target
    reps: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    rows = []
    for k in range(b.args.reps):
        order = ("on", "off") if k % 2 == 0 else ("off", "on")  # alternate who goes first
        for arm in order:
            r = b.run(f"d-{arm}-{k}", peers, dataset=ds, epochs=b.args.tta_epochs,
                      eval_every=every, robust=arm == "on")  # fmt: skip
            r["time_to_target_s"], r["step_to_target"] = reach(r, target, peers)
            t, started = r["time_to_target_s"], r["all_started_s"]
            r["training_to_target_s"] = t - started if t is not None and started else None
            reps[arm].append(r)
        on, off = reps["on"][-1], reps["off"][-1]
        ratio = (
            on["time_to_target_s"] / off["time_to_target_s"]
            if on["time_to_target_s"] and off["time_to_target_s"]
            else None
        )
        rows.append(
            [
                k,
                fmt(on["time_to_target_s"], ".1f"),
                fmt(off["time_to_target_s"], ".1f"),
                fmt(ratio, ".3f"),
                fmt(on["training_to_target_s"], ".1f"),
                fmt(off["training_to_target_s"], ".1f"),
                on["step_to_target"] or "-",
                off["step_to_target"] or "-",
                f"{1000 * on['gossip_cpu_s'] / max(1, on['exchanges']):.2f}",
                f"{1000 * off['gossip_cpu_s'] / max(1, off['exchanges']):.2f}",
                on["refused_honest"],
                on["clipped"],
                "-".join(f"{x:.1f}" for x in on["load_1m"]),
                "-".join(f"{x:.1f}" for x in off["load_1m"]),
            ]
        )
    ratios = [
        a["time_to_target_s"] / c["time_to_target_s"]
        for a, c in zip(reps["on"], reps["off"], strict=True)
        if a["time_to_target_s"] and c["time_to_target_s"]
    ]
    headers = ["rep", "on (s)", "off (s)", "on / off", "on, training (s)",
               "off, training (s)", "step on", "step off",
               "gossip ms/exch on", "gossip ms/exch off", "refused", "clipped", "load on",
               "load off"]  # fmt: skip
    table = markdown_table(headers, rows)
    steps = {a: median([r["step_to_target"] for r in reps[a]]) for a in reps}
    trained = [
        a["training_to_target_s"] / c["training_to_target_s"]
        for a, c in zip(reps["on"], reps["off"], strict=True)
        if a["training_to_target_s"] and c["training_to_target_s"]
    ]
    table += f"\n\nmedian on / off: {fmt(median(ratios), '.3f')} over {len(ratios)} pairs; "
    table += f"training time only (from the last peer's start): {fmt(median(trained), '.3f')}; "
    table += f"median step to target: on {fmt(steps['on'], '.0f')}, off {fmt(steps['off'], '.0f')}"
    cost = screening_cost([101_770, 1_000_000, 10_000_000])
    table += "\n\nCPU per received vector after the transfer (delta, norms, add), in process:\n\n"
    table += markdown_table(["floats", "plain (ms)", "robust (ms)", "robust / plain"], cost)
    title = f"### (d) time to {target:.1%}, no attacker, {peers} peers, robust on vs off\n\n"
    result = {"target": target, "eval_every": every, "reps": reps, "ratios": ratios,
              "median_ratio": median(ratios), "median_step": steps,
              "training_ratios": trained, "median_training_ratio": median(trained),
              "screening_cost_ms": cost}  # fmt: skip
    return result, title + table


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="a,b,c,d", help="parts to run, e.g. a,c (default all)")
    p.add_argument("--data-dir", default=str(DEFAULT_MNIST), help="MNIST IDX folder")
    p.add_argument("--fashion-dir", default=str(DEFAULT_FASHION), help="Fashion-MNIST folder")
    p.add_argument("--epochs", type=float, default=5.0, help="local epochs of a, b, c")
    p.add_argument("--tta-epochs", type=float, default=5.0, help="local epochs of d's runs")
    p.add_argument("--target", type=float, default=0.97, help="d: accuracy every peer reaches")
    p.add_argument("--reps", type=int, default=3, help="d: interleaved repetitions")
    p.add_argument("--c-reps", type=int, default=3, help="c: interleaved repetitions")
    p.add_argument("--c-sets", default="mnist,fashion-mnist", help="c: data sets")
    p.add_argument("--b-modes", default=",".join(MODES), help="b: poison modes to run")
    p.add_argument(
        "--off-modes", default="zero", help="a: modes also run with robust mixing off (the threat)"
    )
    p.add_argument("--linger", type=float, default=60.0, help="--linger of every run")
    p.add_argument("--timeout", type=float, default=1800.0, help="deadline of one run (s)")
    p.add_argument("--quick", action="store_true", help="bundled data set, 0.5 epochs, 1 rep")
    p.add_argument("--keep", help="folder for the run dirs (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.tta_epochs, args.reps, args.c_reps = 0.5, 2.0, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parts = [x for x in args.only.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; parts are a, b, c, d")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="poison-"))
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, root)
    result: dict[str, Any] = {"command": command_line(), "machine": machine_info(),
                              "settings": vars(args) | {"json": str(args.json)}}  # fmt: skip
    tables = []
    for part in parts:
        got, table = PARTS[part](bench)
        result[part] = got
        tables.append(table)
        print(table + "\n", flush=True)  # as it goes: the whole set takes a while
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(result, tables, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
