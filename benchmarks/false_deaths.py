"""Does an overloaded group of training peers declare live peers dead?

Starts ``--peers`` real peer processes on 127.0.0.1 (``python -m trainer.cli peer``, the
bundled data set, one torch thread each, membership profile ``--profile``), waits until they
all see each other, then lets them train for ``--duration`` seconds with nothing killed or
paused. 8 peers on 2 cores is the point: every core is busy, and each peer's event loop
shares its process with a training thread that wants a whole core.

Counted per peer, inside the measured window (after everybody met):

- ``declared_dead``: false deaths (nobody was killed), the target is zero;
- ``suspect``: suspicions it raised about others, and how often others suspected it;
- ``alive``: suspicions (or deaths) it saw cleared: a suspect peer's refutation arrived;
- refutations it sent itself (its log's "refuting suspicion" lines);
- the worst event-loop lag its membership driver logged, and the lag score it logged with
  it (one step per half probe timeout; Swim clamps what it uses to awareness_max_multiplier - 1);
- training done meanwhile (steps, exchanges) and the CPU it got (cores), to show the load.

Run: .venv/bin/python benchmarks/false_deaths.py [--quick] [--peers 8] [--duration 300]
     [--profile local] [--json out.json]
Every process it starts is killed when it ends, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import command_line, emit, machine_info, markdown_table
from failure_detection import Group, PeerProcess, group_of, load_now, uptime_line

log = logging.getLogger(__name__)

# Seconds between load-average samples during the measured window.
LOAD_EVERY = 15.0
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LAGGED = re.compile(r"event loop lagged ([0-9.]+) s; health score (\d+)")


def log_lines(p: PeerProcess, t0: float, t1: float) -> list[str]:
    """The peer's log lines stamped inside [t0, t1] (the log's local-time stamps)."""
    out = []
    for line in p.log_path.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        ts = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t0 <= ts <= t1:
            out.append(line)
    return out


def window(p: PeerProcess, kind: str, t0: float, t1: float) -> list[dict[str, Any]]:
    return [e for e in p.of(kind, since=t0) if e["ts"] <= t1]


def peer_row(p: PeerProcess, t0: float, t1: float, cpu0: float, cpu1: float) -> dict[str, Any]:
    lines = log_lines(p, t0, t1)
    lags = [(float(m.group(1)), int(m.group(2))) for m in map(LAGGED.search, lines) if m]
    progress = window(p, "progress", t0, t1)
    first, last = (progress[0], progress[-1]) if progress else ({}, {})
    return {
        "peer": p.name,
        "declared_dead": len(window(p, "declared_dead", t0, t1)),
        "suspect": len(window(p, "suspect", t0, t1)),
        "alive": len(window(p, "alive", t0, t1)),
        "left": len(window(p, "left", t0, t1)),
        "refutations_sent": sum("refuting suspicion" in line for line in lines),
        "max_loop_lag_s": max((lag for lag, _ in lags), default=0.0),
        "max_lag_score": max((score for _, score in lags), default=0),
        "min_alive_seen": min((e["alive"] for e in progress), default=None),
        "steps": last.get("step", 0) - first.get("step", 0),
        "exchanges": last.get("exchanges", 0) - first.get("exchanges", 0),
        "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
    }


def suspected_counts(group: Group, t0: float, t1: float) -> Counter[str]:
    """How often each peer was suspected by the others inside the window."""
    counts: Counter[str] = Counter()
    for p in group.all:
        for e in window(p, "suspect", t0, t1):
            counts[e.get("subject", "?")] += 1
    return counts


def event_log(group: Group, t0: float, t1: float) -> list[dict[str, Any]]:
    """Every membership event other than joins inside the window, in time order."""
    kinds = ("suspect", "alive", "declared_dead", "left")
    out = [
        {"t": round(e["ts"] - t0, 3), "peer": p.name, "kind": k, "subject": e.get("subject")}
        for p in group.all
        for k in kinds
        for e in window(p, k, t0, t1)
    ]
    return sorted(out, key=lambda e: e["t"])


def watch(group: Group, duration: float) -> tuple[list[list[float]], list[str]]:
    """Sleep through the window, sampling the load; note peers that exit meanwhile."""
    samples, exited = [], []
    end = time.monotonic() + duration
    next_sample = 0.0
    while (now := time.monotonic()) < end:
        if now >= next_sample:
            samples.append(load_now())
            next_sample = now + LOAD_EVERY
            log.info("load %s; %.0f s left", samples[-1], end - now)
        for p in group.live:
            if not p.running() and p.name not in exited:
                exited.append(p.name)
                log.warning("%s exited during the run; see %s", p.name, p.log_path)
        time.sleep(min(1.0, max(0.0, end - now)))
    return samples, exited


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    info["uptime_at_start"] = uptime_line()
    with group_of(args.peers, args.profile, args.run_dir) as group:
        t_start = time.time()
        group.start_all()
        met_s = group.wait_met(t_start)
        log.info("%d peers met after %.1f s; measuring %.0f s", args.peers, met_s, args.duration)
        t0 = time.time()
        cpu0 = [p.cpu_seconds() for p in group.live]
        samples, exited = watch(group, args.duration)
        cpu1 = [p.cpu_seconds() for p in group.live]
        t1 = time.time()
        time.sleep(1.0)  # the last events in flight reach the readers
        rows = [
            peer_row(p, t0, t1, c0, c1) for p, c0, c1 in zip(group.live, cpu0, cpu1, strict=True)
        ]
        suspected = suspected_counts(group, t0, t1)
        for row in rows:
            row["suspected_by_others"] = suspected.get(row["peer"], 0)
        joining = {
            k: sum(1 for p in group.all for e in p.of(k) if e["ts"] < t0)
            for k in ("suspect", "alive", "declared_dead")
        }
        events = event_log(group, t0, t1)
    info["uptime_at_end"] = uptime_line()
    totals = {k: sum(r[k] for r in rows) for k in ("declared_dead", "suspect", "alive", "left")}
    totals["refutations_sent"] = sum(r["refutations_sent"] for r in rows)
    return {
        "benchmark": "false_deaths",
        "command": command_line(),
        "machine": info,
        "params": {"peers": args.peers, "duration_s": args.duration, "profile": args.profile},
        "meet_s": round(met_s, 2),
        "window_s": round(t1 - t0, 1),
        "loadavg_samples": samples,
        "loadavg_1min": {
            "median": statistics.median(s[0] for s in samples),
            "max": max(s[0] for s in samples),
        },
        "cpu_cores_total": round(sum(r["cpu_cores"] for r in rows), 2),
        "totals": totals,
        "target_met": totals["declared_dead"] == 0 and not exited,
        "exited_during_run": exited,
        "events_while_joining": joining,
        "peers": rows,
        "events": events,
    }


def tables(result: dict[str, Any]) -> list[str]:
    keys = (
        "declared_dead",
        "suspect",
        "suspected_by_others",
        "alive",
        "refutations_sent",
        "max_loop_lag_s",
        "max_lag_score",
        "min_alive_seen",
        "steps",
        "exchanges",
        "cpu_cores",
    )
    rows = [[r["peer"], *(r[k] for k in keys)] for r in result["peers"]]
    t = result["totals"]
    rows.append(["total", t["declared_dead"], t["suspect"], t["suspect"], t["alive"]])
    rows[-1] += [t["refutations_sent"], "", "", "", "", "", result["cpu_cores_total"]]
    per_peer = markdown_table(["peer", *keys], rows)
    load = result["loadavg_1min"]
    summary = markdown_table(
        ["peers", "window (s)", "false deaths", "suspicions", "load 1-min median", "max"],
        [
            [
                result["params"]["peers"],
                result["window_s"],
                t["declared_dead"],
                t["suspect"],
                load["median"],
                load["max"],
            ]
        ],
    )
    return [summary, per_peer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 peers for 20 s")
    parser.add_argument("--peers", type=int, default=8, help="peers in the group (default 8)")
    parser.add_argument(
        "--duration", type=float, default=300.0, help="measured seconds (default 300)"
    )
    parser.add_argument("--profile", default="local", help="membership profile (default local)")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep peer logs here (temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.peers, args.duration = 4, 20.0
    if args.peers < 2 or args.duration <= 0:
        parser.error("need --peers >= 2 and --duration > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        result = run(args)
    except KeyboardInterrupt:
        log.warning("interrupted; every peer process it started has been killed")
        sys.exit(130)
    emit(result, tables(result), args.json)


if __name__ == "__main__":
    main()
