"""The robustness report of a chaos run: RUN_DIR/report.md and the report.json behind it.

Per fault: how long until the other peers noticed (first ``suspect`` / ``declared_dead`` of
the faulty peer by another), how long membership took to be whole again after a heal, a
resume or a restart, and how much the other peers stalled (their longest gap between
progress lines in the window after the fault, and their step rate after / before). For the
run: each peer's accuracy against a no-fault baseline run with the same seed. Invariants:
every live peer ended within epsilon of the consensus; nothing non-finite was ever trained
on or saved; every checkpoint loads.

    python -m trainer.chaos.report RUN_DIR [--baseline BASELINE_RUN_DIR] [--epsilon 0.05]

Times are seconds on the launcher's clock (summary.json ``t``). A fault's accuracy impact
cannot be separated from the other faults of the same run; the impact is the run's, and a
scenario with one fault measures that fault alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMBER_KINDS = {
    "joined": "alive",
    "alive": "alive",
    "suspect": "suspect",
    "declared_dead": "dead",
    "left": "left",
}
# Seconds around a fault in which the other peers' progress is compared.
STALL_WINDOW = 10.0
# Faults that take a peer away, and the events that say someone noticed.
TAKES_AWAY = ("kill", "restart", "pause")
NOTICED = ("suspect", "declared_dead")
UNDO = {
    "pause": "resume",
    "partition": "heal",
    "slow-link": "unslow-link",
    "slow-peer": "unslow-peer",
    "poison": "unpoison",
}


# -- membership over time -------------------------------------------------------------------------


@dataclass
class Views:
    """Replays membership events: who (observer) sees whom (subject) in which state."""

    views: dict[str, dict[str, str]] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)

    def apply(self, ev: dict[str, Any]) -> None:
        kind, peer = ev.get("kind"), ev.get("peer")
        if not isinstance(peer, str):
            return
        if kind in ("spawned", "listening"):
            self.views[peer] = {}  # a new process knows nobody yet
            self.live.discard(peer)
        elif kind == "started":
            self.live.add(peer)
        elif kind in ("finished", "exited"):
            self.live.discard(peer)
        elif kind in MEMBER_KINDS and isinstance(ev.get("subject"), str):
            self.views.setdefault(peer, {})[ev["subject"]] = MEMBER_KINDS[kind]

    def whole(self) -> bool:
        """Every live peer sees every other live peer alive (needs two or more)."""
        if len(self.live) < 2:
            return False
        return all(
            self.views.get(o, {}).get(s) == "alive" for o in self.live for s in self.live if o != s
        )

    def split(self, groups: Sequence[Sequence[str]]) -> bool:
        """Every live peer sees every live peer across the cut dead (or at least suspect)."""
        side = {p: g for g, members in enumerate(groups) for p in members}
        pairs = [(o, s) for o in self.live for s in self.live if side.get(o) != side.get(s)]
        return bool(pairs) and all(
            self.views.get(o, {}).get(s) in ("dead", "suspect") for o, s in pairs
        )


def first_time(
    events: Sequence[dict[str, Any]], since: float, test: str, *args: Any
) -> float | None:
    """Seconds from ``since`` until ``Views.<test>(*args)`` first holds (0 if it holds then).
    ``events`` must be sorted by time."""
    views = Views()
    checked = False
    for ev in events:
        t = float(ev.get("t", 0.0))
        if t > since and not checked:
            checked = True
            if getattr(views, test)(*args):
                return 0.0
        views.apply(ev)
        if t >= since and getattr(views, test)(*args):
            return round(t - since, 3)
    return None


def noticed(
    events: Iterable[dict[str, Any]],
    since: float,
    pairs: set[tuple[str, str]],
    kinds: Sequence[str],
    until: float = math.inf,
) -> float | None:
    """Seconds from ``since`` to the first event of ``kinds`` by an (observer, subject) pair,
    if it comes before ``until``."""
    for ev in events:
        t = float(ev.get("t", 0.0))
        if t >= until:
            return None
        if t >= since and ev.get("kind") in kinds and (ev.get("peer"), ev.get("subject")) in pairs:
            return round(t - since, 3)
    return None


def back_at(events: Iterable[dict[str, Any]], since: float, peers: Sequence[str]) -> float:
    """When a taken-away peer answers again as a new process (its next "listening")."""
    for ev in events:
        if float(ev.get("t", 0.0)) > since and ev.get("kind") == "listening":
            if ev.get("peer") in peers:
                return float(ev["t"])
    return math.inf


# -- progress around a fault ----------------------------------------------------------------------

Intervals = dict[str, list[tuple[float, float]]]


def training_intervals(
    events: Sequence[dict[str, Any]], progress: Sequence[dict[str, Any]]
) -> Intervals:
    """When each peer was training: from "started" to its exit, "finished", or its last step
    (a peer that has done its steps only averages while it lingers; it makes no progress)."""
    last_step = {
        str(p["peer"]): float(p["t"])
        for p in progress
        if isinstance(p.get("step"), int) and p.get("step") == p.get("total")
    }
    out: Intervals = {}
    open_at: dict[str, float] = {}
    for ev in events:
        peer, kind, t = ev.get("peer"), ev.get("kind"), float(ev.get("t", 0.0))
        if not isinstance(peer, str):
            continue
        if kind == "started":
            open_at[peer] = t
        elif kind in ("exited", "finished") and peer in open_at:
            start = open_at.pop(peer)
            done = last_step.get(peer, math.inf)
            out.setdefault(peer, []).append((start, min(t, done if done >= start else t)))
    for peer, start in open_at.items():
        out.setdefault(peer, []).append((start, last_step.get(peer, math.inf)))
    return out


def stall(
    progress: Sequence[dict[str, Any]],
    intervals: Intervals,
    t: float,
    others: Iterable[str],
    window: float = STALL_WINDOW,
) -> dict[str, Any]:
    """The other peers' longest time without a step in [t, t + window] while they train,
    and their step rate after the fault divided by the rate before (1.0: no effect)."""
    longest, ratios = 0.0, []
    for peer in others:
        life = [(a, b) for a, b in intervals.get(peer, []) if a <= t < b]
        if not life:
            continue  # not training at the time of the fault
        end = min(t + window, life[0][1])
        rows = [(float(p["t"]), int(p["step"])) for p in progress if p.get("peer") == peer]
        after = [pt for pt, _ in rows if t <= pt <= end]
        times = [t, *after, end]
        longest = max(longest, max(b - a for a, b in zip(times, times[1:], strict=False)))
        before = _rate(rows, max(t - window, life[0][0]), t)
        rate_after = _rate(rows, t, end)
        if before and rate_after is not None:
            ratios.append(rate_after / before)
    return {
        "longest_gap_s": round(longest, 3),
        "rate_ratio": round(min(ratios), 3) if ratios else None,
    }


def _rate(rows: Sequence[tuple[float, int]], a: float, b: float) -> float | None:
    inside = [(t, s) for t, s in rows if a <= t <= b]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# -- per fault ------------------------------------------------------------------------------------


def analyse_faults(
    events: Sequence[dict[str, Any]], progress: Sequence[dict[str, Any]], names: Sequence[str]
) -> list[dict[str, Any]]:
    events = sorted(events, key=lambda e: float(e.get("t", 0.0)))
    intervals = training_intervals(events, progress)
    return [
        _fault_row(ev, events, progress, names, intervals)
        for ev in events
        if ev.get("kind") in ("fault", "fault_failed")
    ]


def _undone_at(events: Sequence[dict[str, Any]], t: float, kind: str, peers: list[str]) -> float:
    """When the fault that started at ``t`` was undone (resume, heal, ...), if it was."""
    undo = UNDO.get(kind)
    for ev in events:
        if float(ev.get("t", 0.0)) > t and ev.get("kind") == "fault" and ev.get("fault") == undo:
            if list(ev.get("peers", [])) == peers:
                return float(ev["t"])
    return math.inf


def _fault_row(
    ev: dict[str, Any],
    events: Sequence[dict[str, Any]],
    progress: Sequence[dict[str, Any]],
    names: Sequence[str],
    intervals: Intervals,
) -> dict[str, Any]:
    t, kind = float(ev["t"]), str(ev.get("fault"))
    peers = [str(p) for p in ev.get("peers", [])]
    groups = [[str(p) for p in g] for g in ev.get("groups", [])]
    row: dict[str, Any] = {
        "t": t,
        "fault": kind,
        "peers": peers,
        "groups": groups,
        "source": ev.get("source"),
        "failed": ev.get("error"),
    }
    if ev.get("kind") == "fault_failed" or ev.get("skipped"):
        row["skipped"] = ev.get("skipped")
        return row
    others = [n for n in names if n not in peers]
    if kind in TAKES_AWAY or kind in ("slow-peer", "slow-link"):
        # Only what others say before the fault ends (a resume, the new process of a
        # restarted peer) is about this fault.
        until = min(back_at(events, t, peers), _undone_at(events, t, kind, peers))
        pairs = {(o, p) for o in others for p in peers}
        row["detected_s"] = noticed(events, t, pairs, NOTICED, until)
        row["declared_dead_s"] = noticed(events, t, pairs, ("declared_dead",), until)
    if kind == "partition":
        side = {p: g for g, members in enumerate(groups) for p in members}
        pairs = {(o, s) for o in names for s in names if side.get(o) != side.get(s)}
        until = _undone_at(events, t, kind, [])
        row["detected_s"] = noticed(events, t, pairs, NOTICED, until)
        row["split_s"] = first_time(events, t, "split", groups)
    if kind in ("resume", "heal", "unslow-link", "unslow-peer"):
        row["whole_s"] = first_time(events, t, "whole")
    if kind in ("kill", "restart"):
        # Back (a restart, or a kill that a supervisor undid): the new process trains again;
        # whole: from then on everybody sees everybody.
        back = [
            float(e["t"])
            for e in events
            if e.get("peer") in peers and e.get("kind") == "started" and float(e["t"]) >= t
        ]
        row["back_s"] = round(back[0] - t, 3) if back else None
        whole = first_time(events, back[0], "whole") if back else None
        row["whole_s"] = round(back[0] - t + whole, 3) if back and whole is not None else None
    row["stall"] = stall(progress, intervals, t, others)
    return row


# -- accuracy and invariants --------------------------------------------------------------------


def lower_is_better(metric: str) -> bool:
    """Loss-like metrics (a name with loss, error or perplexity) improve downwards."""
    name = metric.lower()
    return any(word in name for word in ("loss", "error", "perplexity", "ppl"))


def headline_metric(summary: dict[str, Any]) -> str:
    """The run's headline metric: the first its peers' task reports (accuracy if none)."""
    for p in summary.get("peers", []):
        if p.get("metrics"):
            return str(next(iter(p["metrics"])))
    return "accuracy"


def _value(record: dict[str, Any], metric: str, legacy: str) -> float | None:
    found = (record.get("metrics") or {}).get(metric)
    if found is None and metric == "accuracy":
        found = record.get(legacy)
    return found


def quality(summary: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Each peer's headline metric against the no-fault baseline's, and the consensus's.

    Differences are in percentage points for accuracy, in the metric's own units otherwise;
    ``behind_unrestarted`` is how much worse a restarted peer ends than the mean of the
    peers never restarted (positive: worse), whichever way the metric improves.
    """
    metric = headline_metric(summary)
    scale = 100.0 if metric == "accuracy" else 1.0
    worse = 1.0 if lower_is_better(metric) else -1.0
    base = {
        p["name"]: _value(p, metric, "test_accuracy") for p in (baseline or {}).get("peers", [])
    }
    steady = [
        v
        for p in summary["peers"]
        if p.get("status") == "finished" and not p.get("restarts")
        if (v := _value(p, metric, "test_accuracy")) is not None
    ]
    steady_mean = sum(steady) / len(steady) if steady else None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(scale * (a - b), 4)

    peers = []
    for p in summary["peers"]:
        value = _value(p, metric, "test_accuracy")
        behind = diff(value, steady_mean) if p.get("restarts") else None
        peers.append(
            {
                "name": p["name"],
                "status": p.get("status"),
                "restarts": p.get("restarts", 0),
                "value": value,
                "baseline": base.get(p["name"]),
                "delta": diff(value, base.get(p["name"])),
                "behind_unrestarted": None if behind is None else round(worse * behind, 4),
            }
        )
    cons = _value(
        {"metrics": summary.get("consensus_metrics"), **summary}, metric, "consensus_test_accuracy"
    )
    base_cons = (
        _value(
            {"metrics": baseline.get("consensus_metrics"), **baseline},
            metric,
            "consensus_test_accuracy",
        )
        if baseline
        else None
    )
    return {
        "metric": metric,
        "unit": "pp" if metric == "accuracy" else "",
        "peers": peers,
        "consensus": cons,
        "baseline_consensus": base_cons,
        "consensus_delta": diff(cons, base_cons),
    }


def invariants(run_dir: Path, summary: dict[str, Any], epsilon: float) -> dict[str, Any]:
    import torch

    from ..checkpoint import CheckpointError, load_any, load_checkpoint, model_state

    def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1).double() for v in state.values()])

    out: dict[str, Any] = {}
    # A peer left poisoned at the end holds the poison: it is neither in the consensus
    # (summary.py) nor held to it.
    live = [
        p
        for p in summary["peers"]
        if p.get("status") == "finished" and p.get("final_model") and not p.get("poisoned")
    ]
    cons_path = run_dir / "consensus.pt"
    distances = {}
    finite_final = True
    if cons_path.is_file() and live:
        cons = flat(model_state(load_any(cons_path)))
        for p in live:
            w = flat(model_state(load_any(p["final_model"])))
            finite_final &= bool(torch.isfinite(w).all())
            distances[p["name"]] = round(float((w - cons).norm() / cons.norm()), 6)
    out["converged"] = {
        "ok": bool(distances) and all(d <= epsilon for d in distances.values()),
        "epsilon": epsilon,
        "relative_distance": distances,
        "peers": len(live),
    }
    ckpts, bad, nonfinite = 0, [], []
    for path in sorted(run_dir.glob("peer-*/checkpoints/*.pt")):
        ckpts += 1
        try:
            state = model_state(load_checkpoint(path))
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            bad.append(f"{path.relative_to(run_dir)}: {exc}")
            continue
        if not bool(torch.isfinite(flat(state)).all()):
            nonfinite.append(str(path.relative_to(run_dir)))
    out["checkpoints_load"] = {"ok": not bad, "files": ckpts, "failed": bad}
    losses = _progress_losses(run_dir)
    out["finite"] = {
        "ok": finite_final and not nonfinite and all(math.isfinite(x) for x in losses),
        "final_models_finite": finite_final,
        "nonfinite_checkpoints": nonfinite,
        "losses_checked": len(losses),
        "rejected_updates": sum(int(p.get("rejected_updates") or 0) for p in summary["peers"]),
    }
    return out


def _progress_losses(run_dir: Path) -> list[float]:
    out: list[float] = []
    try:
        lines = (run_dir / "progress.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        loss = json.loads(line).get("loss")
        if isinstance(loss, int | float):
            out.append(float(loss))
    return out


# -- poisoning and robust mixing ------------------------------------------------------------------


def poisoning(summary: dict[str, Any]) -> dict[str, Any]:
    """Who was poisoned when (the peers' own ``poison`` events), every refusal and
    quarantine of robust mixing (``refused`` / ``quarantined`` events, by observer and by
    subject), each peer's screening counters, and the honest peers' headline metric."""
    events = summary.get("events", [])
    windows: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("kind") != "poison" or not isinstance(e.get("peer"), str):
            continue
        spans = windows.setdefault(e["peer"], [])
        if e.get("mode") == "none":
            if spans and spans[-1]["until"] is None:
                spans[-1]["until"] = e["t"]
        else:
            spans.append({"mode": e.get("mode"), "factor": e.get("factor"), "from": e["t"]})
            spans[-1]["until"] = None
    hostile = set(windows)
    rows: dict[str, dict[str, Any]] = {}
    by_subject: dict[str, dict[str, int]] = {}
    quarantines = []
    for e in events:
        kind, peer = e.get("kind"), e.get("peer")
        if kind not in ("refused", "quarantined") or not isinstance(peer, str):
            continue
        row = rows.setdefault(peer, {"refused": 0, "quarantines": 0, "honest_refused": 0})
        subject = str(e.get("subject"))
        if kind == "refused":
            row["refused"] += 1
            row["honest_refused"] += subject not in hostile
            counts = by_subject.setdefault(subject, {"refused": 0, "quarantined": 0})
            counts["refused"] += 1
        else:
            row["quarantines"] += 1
            by_subject.setdefault(subject, {"refused": 0, "quarantined": 0})["quarantined"] += 1
            quarantines.append(
                {
                    "t": e["t"],
                    "by": peer,
                    "subject": subject,
                    "seconds": e.get("seconds"),
                    "reason": e.get("reason"),
                    "honest_subject": subject not in hostile,
                }
            )
    peers = []
    metric = headline_metric(summary)
    honest_values = []
    for p in summary.get("peers", []):
        name = p["name"]
        stats = p.get("screening") or {}
        row = rows.get(name, {"refused": 0, "quarantines": 0, "honest_refused": 0})
        value = _value(p, metric, "test_accuracy")
        if name not in hostile and value is not None:
            honest_values.append(value)
        peers.append(
            {
                "name": name,
                "poisoned": windows.get(name, []),
                "refused": row["refused"],
                "honest_refused": row["honest_refused"],
                "quarantines": row["quarantines"],
                "clipped": stats.get("clipped"),
                "accepted": stats.get("accepted"),
                "largest_ratio": stats.get("largest_ratio"),
                "value": value,
            }
        )
    return {
        "robust": any(p.get("screening") is not None for p in summary.get("peers", [])),
        "metric": metric,
        "peers": peers,
        "by_subject": by_subject,
        "quarantines": quarantines,
        "honest_min": min(honest_values, default=None),
        "honest_mean": sum(honest_values) / len(honest_values) if honest_values else None,
        "honest_refused": sum(r["honest_refused"] for r in rows.values()),
        "honest_quarantined": sum(1 for q in quarantines if q["honest_subject"]),
    }


# -- the report -----------------------------------------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return []


def build_report(
    run_dir: str | Path, baseline: str | Path | None = None, epsilon: float = 0.05
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    base = json.loads((Path(baseline) / "summary.json").read_text()) if baseline else None
    names = [p["name"] for p in summary["peers"]]
    events = summary["events"]
    inv = invariants(run_dir, summary, epsilon)
    return {
        "poisoning": poisoning(summary),
        "bytes": traffic(summary),
        "run_dir": str(run_dir),
        "baseline_dir": str(baseline) if baseline else None,
        "network": summary.get("network"),
        "chaos": summary.get("chaos"),
        "faults": analyse_faults(events, _load(run_dir / "progress.jsonl"), names),
        "quality": quality(summary, base),
        "invariants": inv,
        "invariants_ok": all(v["ok"] for v in inv.values()),
    }


def traffic(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Each peer's bytes by kind and the run's, from summary.json (None: an older run)."""
    if not summary.get("bytes"):
        return None
    return {
        "peers": [{"name": p["name"], "bytes": p.get("bytes")} for p in summary["peers"]],
        "total": summary["bytes"],
        "compression_ratio": summary.get("compression_ratio"),
    }


def render_traffic(t: dict[str, Any] | None) -> list[str]:
    """The report's small table of bytes by kind, in MB out / in ([] for an older run)."""
    if not t:
        return []
    kinds = list(t["total"])
    lines = [
        "## Bytes by kind",
        "",
        "MB sent / received, framing included (sealed: the records on the wire). Weight "
        f"payloads compressed {_fmt(t['compression_ratio'] or 1.0)}x.",
        "",
        "| peer | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for row in [*t["peers"], {"name": "**all**", "bytes": t["total"]}]:
        got = row["bytes"] or {}
        cells = [
            f"{got[k]['sent'] / 1e6:.3f} / {got[k]['received'] / 1e6:.3f}" if k in got else "-"
            for k in kinds
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def render(report: dict[str, Any]) -> str:
    net = report.get("network") or {}
    chaos = report.get("chaos") or {}
    lines = [
        f"# Robustness report: {report['run_dir']}",
        "",
        f"- network mode: **{net.get('mode', '?')}**"
        + (f" (subnet {net['subnet']}.0/24)" if net.get("subnet") else ""),
        f"- chaos seed: {chaos.get('seed', '-')}; planned actions: {len(chaos.get('plan', []))}",
        f"- baseline (no faults, same seed): {report.get('baseline_dir') or 'none given'}",
        "",
        "## Faults",
        "",
        "Times in seconds after the fault. detected: first suspect/dead of the target by "
        "another peer; whole: membership whole again; stall: the others' longest gap without "
        "a step in the next 10 s (progress resolution 0.5 s); rate: their step rate after / "
        "before.",
        "",
        "| t | fault | target | detected | dead | split | back | whole | stall | rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in report["faults"]:
        target = "/".join(",".join(g) for g in f["groups"]) if f["groups"] else ",".join(f["peers"])
        if f.get("failed") or f.get("skipped"):
            lines.append(
                f"| {f['t']:.1f} | {f['fault']} | {target} | "
                f"{f.get('failed') or f.get('skipped')} |||||||"
            )
            continue
        s = f.get("stall", {})
        cells = [
            f.get(k) for k in ("detected_s", "declared_dead_s", "split_s", "back_s", "whole_s")
        ]
        lines.append(
            f"| {f['t']:.1f} | {f['fault']} | {target} | "
            + " | ".join(_fmt(c) for c in cells)
            + f" | {_fmt(s.get('longest_gap_s'))} | {_fmt(s.get('rate_ratio'))} |"
        )
    q = report["quality"]
    metric, unit = q["metric"], f" ({q['unit']})" if q["unit"] else ""
    lines += [
        "",
        f"## {metric} against the baseline",
        "",
        f"| peer | status | restarts | {metric} | baseline | delta{unit} "
        f"| behind unrestarted{unit} |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in q["peers"]:
        lines.append(
            f"| {p['name']} | {p['status']} | {p['restarts']} | {_fmt4(p['value'])} | "
            f"{_fmt4(p['baseline'])} | {_fmt(p['delta'])} | "
            f"{_fmt(p['behind_unrestarted'])} |"
        )
    lines += [
        "",
        f"Consensus model: {_fmt4(q['consensus'])} (baseline {_fmt4(q['baseline_consensus'])}, "
        f"delta {_fmt(q['consensus_delta'])}{q['unit'] and ' ' + q['unit']}).",
        "",
    ]
    lines += render_poisoning(report.get("poisoning"))
    lines += render_traffic(report.get("bytes"))
    lines += [
        "## Invariants",
        "",
    ]
    inv = report["invariants"]
    conv = inv["converged"]
    worst = max(conv["relative_distance"].values(), default=None)
    lines.append(
        f"- [{'x' if conv['ok'] else ' '}] every live peer within epsilon={conv['epsilon']} of "
        f"the consensus (relative L2 distance; worst {_fmt(worst)}, {conv['peers']} peers)"
    )
    fin = inv["finite"]
    lines.append(
        f"- [{'x' if fin['ok'] else ' '}] no non-finite weights or losses: final models, "
        f"checkpoints, {fin['losses_checked']} progress losses "
        f"({fin['rejected_updates']} updates refused at the door)"
    )
    ck = inv["checkpoints_load"]
    lines.append(f"- [{'x' if ck['ok'] else ' '}] every checkpoint loads ({ck['files']} files)")
    lines += [f"  - {x}" for x in ck["failed"]]
    lines.append("")
    return "\n".join(lines)


def render_poisoning(p: dict[str, Any] | None) -> list[str]:
    """The report's section on poisoned peers, refusals and quarantines ([] if none)."""
    if not p or not (p["quarantines"] or p["by_subject"] or any(r["poisoned"] for r in p["peers"])):
        return []
    mixing = "on" if p["robust"] else "**off**"
    lines = [
        "## Poisoning and robust mixing",
        "",
        f"Robust mixing {mixing}. poisoned: when the peer's weights were poison (seconds; "
        "mode); refused: updates this peer refused (of them from honest peers); clipped: "
        "accepted updates it scaled down; largest: its largest accepted update over the "
        "recent median.",
        "",
        "| peer | poisoned | refused | of honest | quarantines | clipped | largest "
        f"| {p['metric']} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["peers"]:
        spans = ", ".join(
            f"{s['from']:.1f}-{'end' if s['until'] is None else format(s['until'], '.1f')} "
            f"{s['mode']}"
            for s in r["poisoned"]
        )
        lines.append(
            f"| {r['name']} | {spans or '-'} | {r['refused']} | {r['honest_refused']} | "
            f"{r['quarantines']} | {_fmt(r['clipped'])} | {_fmt(r['largest_ratio'])} | "
            f"{_fmt4(r['value'])} |"
        )
    lines += [
        "",
        f"Honest peers' {p['metric']}: min {_fmt4(p['honest_min'])}, mean "
        f"{_fmt4(p['honest_mean'])}; updates from honest peers refused: {p['honest_refused']}, "
        f"honest peers quarantined: {p['honest_quarantined']}.",
        "",
    ]
    if p["quarantines"]:
        lines += ["| t | by | quarantined | seconds | why |", "|---|---|---|---|---|"]
        for q in p["quarantines"][:MAX_QUARANTINE_ROWS]:
            lines.append(
                f"| {q['t']:.1f} | {q['by']} | {q['subject']} | {_fmt(q['seconds'])} | "
                f"{q['reason']} |"
            )
        more = len(p["quarantines"]) - MAX_QUARANTINE_ROWS
        if more > 0:
            lines.append(f"| ... | {more} more in report.json |||||")
        lines.append("")
    return lines


# Quarantines listed in report.md (report.json has them all).
MAX_QUARANTINE_ROWS = 20


def _fmt4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_report(
    run_dir: str | Path, baseline: str | Path | None = None, epsilon: float = 0.05
) -> dict[str, Any]:
    """Build the report and write RUN_DIR/report.json and RUN_DIR/report.md."""
    report = build_report(run_dir, baseline, epsilon)
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(render(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.chaos.report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--baseline", help="run dir of the no-fault run with the same seed")
    p.add_argument("--epsilon", type=float, default=0.05)
    args = p.parse_args(argv)
    report = write_report(args.run_dir, args.baseline, args.epsilon)
    print(render(report))
    return 0 if report["invariants_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
