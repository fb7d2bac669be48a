"""Soak: `gossip-train local --peers 8` for 30 minutes under random kills and pauses.

Runs ``gossip-train local --peers 8 --restart-failed`` (``common.start_local``; bundled data
set, or MNIST with ``--data``; a step budget no run reaches, a checkpoint every
``--checkpoint-seconds``) for ``--minutes``, with the launcher's own seeded random faults
(``--random``, docs/chaos.md) during the whole run: SIGKILL of a random peer (the launcher
restarts it from its newest checkpoint) and SIGSTOP of a random peer with SIGCONT
``--pause-seconds`` later, half each, so that each peer sees about one fault every
``--fault-minutes``. The run ends by the launcher's ``--timeout``: it stops every peer
(SIGTERM, after SIGCONT) and writes RUN_DIR/summary.json; afterwards no process the run
started may be left (any that is gets SIGKILL and is reported).

What it measures, from outside the peers:

- **curves**: every ``--sample-seconds`` (60), each live peer's RSS (VmRSS of
  /proc/PID/status) and open file descriptors (entries of /proc/PID/fd), pids from
  RUN_DIR/peers.json (rewritten at every restart); per minute, each peer's value and the
  median and max across peers (and the launcher's own);
- **flat after warm-up**: least-squares slope of the median and the max over the second
  half of the run (MB/min, fds/min), and max - min after ``--warmup-minutes`` (5; half
  the run when the run is shorter than twice that), also per process life;
- **deadlocks**: a peer whose step has not advanced for ``--stall-minutes`` (3) of time in
  which it was neither paused nor dead. Live, every ``--poll-seconds`` (10): its step from
  RUN_DIR/peer-<i>/events.jsonl when the peer writes one, else over STATUS (what
  ``gossip-train members`` asks), and its state from /proc (T: paused); after the run,
  again from RUN_DIR/progress.jsonl, with the pause and kill times from summary.json;
- **lost checkpoints**: every RUN_DIR/peer-<i>/checkpoints/*.pt must load
  (trainer.checkpoint.load_checkpoint: ``torch.load(weights_only=True)`` and the format
  checks), no ``*.corrupt`` file may appear (a peer renames a checkpoint it cannot load),
  and every restarted peer must have ``resumed`` from a checkpoint before training again;
- **restarts, exits and faults** from summary.json, and each peer's final status.

Targets: RSS and fds flat after warm-up (median slope over the second half within
``--rss-slope-max`` MB/min and ``--fd-slope-max`` fds/min), 0 deadlocks, 0 lost
checkpoints, nothing left running.

    .venv/bin/python benchmarks/soak.py                          # 30 min, 8 peers
    .venv/bin/python benchmarks/soak.py --quick                  # 3 min, 4 peers, faster faults
    .venv/bin/python benchmarks/soak.py --minutes 30 --data ../shared/data/mnist --json soak.json

Everything lands in RUN_DIR (default runs/soak-<date-time>): the launcher's run, soak.json
(also ``--json PATH``) and curves.csv (also ``--csv PATH``), one row per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_MNIST,
    REPO,
    Running,
    code_version,
    command_line,
    emit,
    fmt,
    machine_info,
    markdown_table,
    median,
    read_peers,
    read_progress,
    read_report,
    run_keyring,
    start_local,
)

log = logging.getLogger(__name__)

STEPS = 1_000_000_000  # a step budget no soak reaches: training lasts the whole run


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 30.0
    peers: int = 8
    # MNIST folder; "" trains on the bundled data set.
    data: str = ""
    # Each peer gets a fault about once every this many minutes: kills and pauses, half
    # each, each kind at a random peer every 2 x this x 60 / peers seconds (+- a third).
    fault_minutes: float = 4.0
    pause_seconds: float = 10.0
    # Faults begin this long after every peer trains (so each has a checkpoint to resume
    # from) and end this long before the stop (so the last restart is back in time).
    fault_start_s: float = 30.0
    fault_end_margin_s: float = 30.0
    checkpoint_seconds: float = 5.0
    sample_seconds: float = 60.0
    poll_seconds: float = 10.0
    stall_minutes: float = 3.0
    warmup_minutes: float = 5.0
    rss_slope_max: float = 1.0  # MB/min, median across peers over the second half
    fd_slope_max: float = 0.2  # fds/min, the same
    seed: int = 0
    chaos_seed: int = 0
    # Past the planned end, how long to wait for the launcher before stopping it ourselves.
    grace_s: float = 180.0
    extra: tuple[str, ...] = field(default_factory=tuple)  # more `gossip-train local` flags


QUICK = SoakConfig(minutes=3.0, peers=4, fault_minutes=2.0)


def fault_interval(cfg: SoakConfig) -> float:
    """Seconds between two faults of one kind (kill, pause), across the swarm."""
    return 2.0 * cfg.fault_minutes * 60.0 / cfg.peers


def fault_flags(cfg: SoakConfig) -> list[str]:
    every = fault_interval(cfg)
    jitter = round(every / 3, 1)
    until = round(cfg.minutes * 60 - cfg.fault_end_margin_s, 1)
    kills = f"kind=kill every={every:.1f} jitter={jitter} start={cfg.fault_start_s:g} until={until}"
    pause_start = cfg.fault_start_s + every / 2
    pauses = (
        f"kind=pause every={every:.1f} jitter={jitter} start={pause_start:.1f} until={until} "
        f"for={cfg.pause_seconds:g}"
    )
    return ["--random", kills, "--random", pauses, "--chaos-seed", str(cfg.chaos_seed)]


def launcher_args(cfg: SoakConfig) -> list[str]:
    args = ["--peers", str(cfg.peers), "--steps", str(STEPS), "--threads", "1"]
    args += ["--seed", str(cfg.seed), "--checkpoints", "--restart-failed"]
    args += ["--max-restarts", "100000", "--checkpoint-every", str(STEPS)]
    args += ["--checkpoint-seconds", f"{cfg.checkpoint_seconds:g}"]
    # The launcher's clock for --timeout starts once every peer is spawned, a few seconds
    # after launch; the margin keeps the last minute's sample inside the run.
    args += ["--timeout", f"{cfg.minutes * 60 + 20:g}"]
    if cfg.data:
        args += ["--dataset", "mnist", "--data-dir", cfg.data]
    return [*args, *fault_flags(cfg), *cfg.extra]


# -- /proc ------------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """State letter, parent pid and start time (clock ticks since boot), or None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root`` (any depth): pid -> start time."""
    parent: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            got = proc_stat(int(entry))
            if got is not None:
                parent[int(entry)] = (got[1], got[2])
    out: dict[int, int] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for pid, (ppid, start) in parent.items():
            if ppid == p and pid not in out:
                out[pid] = start
                frontier.append(pid)
    return out


# -- a peer's step, live ------------------------------------------------------------------------
def last_progress(events: Path) -> int | None:
    """The step of the last ``progress`` line of a peer's events.jsonl, or None."""
    try:
        with open(events, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("kind") == "progress" and "step" in ev:
            return int(ev["step"])
    return None


async def _statuses(
    addrs: dict[str, str], timeout: float, keyring: Any = None
) -> dict[str, dict[str, Any] | None]:
    from p2p.transport import TransportError
    from trainer.status import fetch_status

    async def one(addr: str) -> dict[str, Any] | None:
        try:
            return await fetch_status(addr, timeout=timeout, keyring=keyring)
        except (TransportError, OSError, TimeoutError, ValueError):
            return None

    got = await asyncio.gather(*(one(a) for a in addrs.values()))
    return dict(zip(addrs, got, strict=True))


def statuses(
    addrs: dict[str, str], timeout: float = 2.0, keyring: Any = None
) -> dict[str, dict[str, Any] | None]:
    """Each peer's STATUS answer (step, members, ...), None where it did not answer."""
    return asyncio.run(_statuses(addrs, timeout, keyring)) if addrs else {}


# -- the live watch -----------------------------------------------------------------------------
@dataclass
class Track:
    """One peer slot's progress as polled: the current life and its step."""

    pid: int | None = None
    step: int | None = None
    active_s: float = 0.0  # running, not paused, not stepping: seconds since the last step
    last_poll: float = 0.0
    stall: dict[str, Any] | None = None  # the open stall episode, once active_s passed the limit


class Watch:
    """Polls the run's peers; keeps the per-minute samples and the live stall episodes."""

    def __init__(self, run_dir: Path, running: Running, cfg: SoakConfig) -> None:
        self.run_dir, self.running, self.cfg = run_dir, running, cfg
        self.tracks: dict[str, Track] = {}
        self.stalls: list[dict[str, Any]] = []
        self.minutes: list[dict[str, Any]] = []
        self.seen: dict[int, int] = {}  # every process of the run: pid -> start time
        self.sources: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # each peer's latest poll

    def since_launch(self, t: float) -> float:
        return t - self.running.launched

    def poll(self) -> None:
        now = time.time()
        # Every process below the launcher (the zygote, the peers it forked): what must be
        # gone after the run. Recorded with its start time, so a reused pid is not taken.
        for pid, start in descendants(self.running.pid).items():
            self.seen.setdefault(pid, start)
        peers = read_peers(self.run_dir)
        live: dict[str, int] = {}
        states: dict[str, str | None] = {}
        for p in peers:
            pid = p.get("pid")
            got = proc_stat(pid) if pid else None
            states[p["name"]] = None if got is None or got[0] in "ZX" else got[0]
            if pid and states[p["name"]] is not None:
                live[p["name"]] = pid
        steps: dict[str, int | None] = {}
        need: dict[str, str] = {}
        for p in peers:
            name = p["name"]
            step = last_progress(self.run_dir / name / "events.jsonl")
            if step is not None:
                steps[name] = step
                self.sources.add("events.jsonl")
            elif name in live and states[name] != "T":
                need[name] = p.get("control") or p["addr"]
        answers = statuses(need, keyring=run_keyring(self.run_dir))
        for name, st in answers.items():
            steps[name] = int(st["step"]) if st and st.get("step") is not None else None
            if st is not None:
                self.sources.add("status")
        for p in peers:
            name = p["name"]
            state, step = states.get(name), steps.get(name)
            st = answers.get(name)
            alive = None
            if st is not None:
                alive = sum(1 for m in st.get("members", []) if m.get("state") == "alive")
            self.last[name] = {"pid": live.get(name), "state": state, "step": step,
                               "alive_members": alive}  # fmt: skip
            self._track(name, live.get(name), state, step, now)

    def _track(self, name: str, pid: int | None, state: str | None, step: int | None,
               now: float) -> None:  # fmt: skip
        tr = self.tracks.setdefault(name, Track(last_poll=now))
        if pid != tr.pid or (step is not None and step != tr.step):
            if tr.stall is not None:
                tr.stall["ended_s"] = round(self.since_launch(now), 1)
                tr.stall = None
            tr.pid, tr.step, tr.active_s = pid, step, 0.0
        elif pid is not None and state not in (None, "T"):
            tr.active_s += now - tr.last_poll
        tr.last_poll = now
        if tr.stall is None and tr.active_s >= self.cfg.stall_minutes * 60:
            since = round(self.since_launch(now) - tr.active_s, 1)
            tr.stall = {"peer": name, "pid": pid, "step": tr.step, "since_s": since,
                        "ended_s": None}  # fmt: skip
            self.stalls.append(tr.stall)
            log.warning("%s: no step for %.0f s while running (step %s)", name, tr.active_s,
                        tr.step)  # fmt: skip

    def sample(self, minute: int) -> None:
        """The per-minute row: every live peer's RSS and fds, the median and max across them."""
        now = time.time()
        row: dict[str, Any] = {"minute": minute, "t_s": round(self.since_launch(now), 1),
                               "peers": {}}  # fmt: skip
        for name, last in sorted(self.last.items(), key=lambda kv: _index(kv[0])):
            pid = last["pid"]
            rss = rss_mb(pid) if pid else None
            fds = fd_count(pid) if pid else None
            row["peers"][name] = {**last, "rss_mb": rss, "fds": fds}
        got = [p for p in row["peers"].values() if p["rss_mb"] is not None and p["fds"]]
        row["live"] = len(got)
        row["paused"] = sum(1 for p in row["peers"].values() if p["state"] == "T")
        row["rss_median_mb"] = median([p["rss_mb"] for p in got])
        row["rss_max_mb"] = max((p["rss_mb"] for p in got), default=None)
        row["fds_median"] = median([p["fds"] for p in got])
        row["fds_max"] = max((p["fds"] for p in got), default=None)
        row["launcher_rss_mb"] = rss_mb(self.running.pid)
        row["launcher_fds"] = fd_count(self.running.pid)
        row["load_1m"] = os.getloadavg()[0]
        self.minutes.append(row)
        log.info(
            "minute %d: %d live, RSS median %s max %s MB, fds median %s max %s, steps %s",
            minute, row["live"], fmt(row["rss_median_mb"], ".0f"), fmt(row["rss_max_mb"], ".0f"),
            fmt(row["fds_median"], ".0f"), row["fds_max"],
            [p["step"] for p in row["peers"].values()],
        )  # fmt: skip


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 0


def watch_run(w: Watch) -> None:
    """Poll until the launcher ends (by its --timeout), sampling once a minute."""
    running, cfg = w.running, w.cfg
    end = running.launched + cfg.minutes * 60 + cfg.grace_s
    next_poll = running.launched + cfg.poll_seconds
    next_sample, minute = running.launched + cfg.sample_seconds, 1
    while running.running():
        now = time.time()
        if now > end:
            log.error("launcher still running %.0f s after the planned end: stopping it",
                      cfg.grace_s)  # fmt: skip
            running.stop()
            break
        if now >= next_poll:
            w.poll()
            next_poll += cfg.poll_seconds
        if now >= next_sample:
            w.sample(minute)
            minute += 1
            last = minute > math.ceil(cfg.minutes)
            next_sample = math.inf if last else next_sample + cfg.sample_seconds
        time.sleep(max(0.05, min(next_poll, next_sample) - time.time()))


# -- after the run ------------------------------------------------------------------------------
def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def flatness(minutes: list[dict[str, Any]], cfg: SoakConfig) -> dict[str, Any]:
    """Slopes over the second half, spread after warm-up: of the median and the max across
    peers, and of each process life that spans at least three samples after warm-up."""
    n = max((r["minute"] for r in minutes), default=0)
    warmup = min(cfg.warmup_minutes, n / 2)
    half = n / 2
    out: dict[str, Any] = {"minutes": n, "warmup_minutes": warmup, "second_half_from": half}
    for key, unit in (("rss", "mb"), ("fds", "")):
        suffix = f"_{unit}" if unit else ""
        for agg in ("median", "max"):
            col = f"{key}_{agg}{suffix}"
            pts = [(r["minute"], r[col]) for r in minutes if r[col] is not None]
            late = [(x, y) for x, y in pts if x > half]
            after = [y for x, y in pts if x > warmup]
            out[f"{col}_slope_per_min"] = slope(late)
            out[f"{col}_spread_after_warmup"] = max(after) - min(after) if after else None
        lives: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for r in minutes:
            for name, p in r["peers"].items():
                value = p["rss_mb" if key == "rss" else "fds"]
                if p["pid"] and value is not None and r["minute"] > warmup:
                    lives.setdefault((name, p["pid"]), []).append((r["minute"], value))
        per_life = {f"{name} pid {pid}": slope(pts) for (name, pid), pts in lives.items()
                    if len(pts) >= 3}  # fmt: skip
        known = {k: v for k, v in per_life.items() if v is not None}
        worst = max(known, key=lambda k: known[k], default=None)
        out[f"{key}_life_slopes_per_min"] = per_life
        out[f"{key}_worst_life"] = {"life": worst, "slope_per_min": known.get(worst or "")}
    rss = out["rss_median_mb_slope_per_min"]
    fds = out["fds_median_slope_per_min"]
    out["rss_flat"] = None if rss is None else rss <= cfg.rss_slope_max
    out["fds_flat"] = None if fds is None else fds <= cfg.fd_slope_max
    return out


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(a: float, b: float, excluded: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in excluded)


def excluded_times(
    events: list[dict[str, Any]], end: float
) -> dict[str, list[tuple[float, float]]]:
    """Per peer, when it was paused (pause to resume, or to its next start) or dead (kill or
    exit to its next spawn), on the launcher's clock."""
    out: dict[str, list[tuple[float, float]]] = {}
    ordered = sorted(events, key=lambda e: e.get("t", 0.0))

    def next_after(peer: str, t: float, kinds: set[tuple[str, str]]) -> float:
        for e in ordered:
            if e.get("t", 0.0) > t and (e.get("kind"), e.get("fault", "")) in kinds:
                if e.get("peer") == peer or peer in e.get("peers", []):
                    return float(e["t"])
        return end

    spawned = {("spawned", "")}
    for e in ordered:
        t = float(e.get("t", 0.0))
        if e.get("kind") == "fault" and not e.get("skipped"):
            for peer in e.get("peers", []):
                if e.get("fault") == "pause":
                    stop = next_after(peer, t, {("fault", "resume"), *spawned})
                    out.setdefault(peer, []).append((t, stop))
                elif e.get("fault") in ("kill", "restart"):
                    out.setdefault(peer, []).append((t, next_after(peer, t, spawned)))
        elif e.get("kind") in ("exited", "gave_up") and e.get("peer"):
            out.setdefault(e["peer"], []).append((t, next_after(e["peer"], t, spawned)))
    return {peer: _merge(iv) for peer, iv in out.items()}


def stalls_after(run_dir: Path, summary: dict[str, Any], cfg: SoakConfig) -> dict[str, Any]:
    """From RUN_DIR/progress.jsonl: per peer, its longest time without a new step while it
    was neither paused nor dead, and every such stretch longer than ``stall_minutes``."""
    path = run_dir / "progress.jsonl"
    if not path.is_file():
        return {"source": None, "note": "no progress.jsonl (the launcher did not finish)"}
    events = summary["events"]
    end = max((float(e.get("t", 0.0)) for e in events), default=0.0)
    excluded = excluded_times(events, end)
    marks: dict[str, list[tuple[float, int | None]]] = {
        peer: [(float(ev["t"]), int(ev["step"])) for ev in evs]
        for peer, evs in read_progress(run_dir).items()
    }
    for e in events:
        if e.get("kind") == "spawned":  # a new life: its first step counts as an advance
            marks.setdefault(e["peer"], []).append((float(e["t"]), None))
    limit = cfg.stall_minutes * 60
    longest: dict[str, float] = {}
    found: list[dict[str, Any]] = []
    for peer, points in marks.items():
        points.sort(key=lambda p: p[0])
        ex = excluded.get(peer, [])
        since, step = points[0]
        worst = 0.0
        for t, s in [*points[1:], (end, -1)]:
            if s != step or s is None:
                active = (t - since) - _covered(since, t, ex)
                worst = max(worst, active)
                if active >= limit:
                    found.append({"peer": peer, "step": step, "from_t": round(since, 1),
                                  "to_t": round(t, 1), "active_s": round(active, 1)})  # fmt: skip
                since, step = t, s
        longest[peer] = round(worst, 1)
    return {"source": "progress.jsonl", "longest_no_step_s": longest, "stalls": found}


def checkpoint_check(run_dir: Path) -> dict[str, Any]:
    """Every checkpoint file loads; no file a peer gave up on; temp files of killed writes."""
    from trainer.checkpoint import CheckpointError, load_any, load_checkpoint

    files, bad = 0, []
    for path in sorted(run_dir.glob("peer-*/checkpoints/*.pt")):
        files += 1
        try:
            (load_checkpoint if path.name.startswith("ckpt-") else load_any)(path)
        except (CheckpointError, OSError) as exc:
            bad.append({"file": str(path.relative_to(run_dir)), "error": str(exc)})
    corrupt = [str(p.relative_to(run_dir)) for p in run_dir.glob("peer-*/checkpoints/*.corrupt")]
    temp = [str(p.relative_to(run_dir)) for p in run_dir.glob("peer-*/checkpoints/.*.tmp")]
    return {"files": files, "failed_to_load": bad, "corrupt_renamed": corrupt,
            "temp_files_left": temp, "lost": len(bad) + len(corrupt)}  # fmt: skip


def restart_check(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Per restart: did the new life resume from a checkpoint before it trained, and from
    which step (against the last step the killed life reported, from progress.jsonl)."""
    events = sorted(summary["events"], key=lambda e: e.get("t", 0.0))
    progress = read_progress(run_dir) if (run_dir / "progress.jsonl").is_file() else {}
    rows, failed = [], 0
    for i, ev in enumerate(events):
        if ev.get("kind") != "restarted":
            continue
        peer = ev["peer"]
        before = [e for e in progress.get(peer, []) if e["t"] < ev["t"]]
        life: list[dict[str, Any]] = []
        for e in events[i + 1 :]:
            if e.get("peer") == peer and e.get("kind") in ("restarted", "exited"):
                break
            if e.get("peer") == peer:
                life.append(e)
        kinds = [e["kind"] for e in life]
        resumed = next((e for e in life if e["kind"] == "resumed"), None)
        trained = "started" in kinds
        ok = resumed is not None and (
            not trained or kinds.index("resumed") < kinds.index("started")
        )
        verdict = (
            "resumed"
            if ok
            else ("trained without resuming" if trained else "ended before training")
        )
        failed += verdict == "trained without resuming"
        rows.append({"peer": peer, "t": ev["t"], "verdict": verdict,
                     "resumed_step": resumed.get("step") if resumed else None,
                     "last_step_before": before[-1]["step"] if before else None})  # fmt: skip
    return {"restarts": len(rows), "not_resumed": failed, "each": rows}


def fault_counts(summary: dict[str, Any]) -> dict[str, Any]:
    events = summary["events"]
    applied: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for e in events:
        if e.get("kind") == "fault":
            into = skipped if e.get("skipped") else applied
            into[e["fault"]] = into.get(e["fault"], 0) + 1
    exits = [e for e in events if e.get("kind") == "exited"]
    return {
        "applied": applied,
        "skipped": skipped,
        "failed": sum(1 for e in events if e.get("kind") == "fault_failed"),
        "exits": len(exits),
        # An exit a kill did not cause (SIGKILL is -9): a crash.
        "crashes": [
            {
                "peer": e["peer"],
                "t": e["t"],
                "returncode": e.get("returncode"),
                "error": e.get("error"),
            }
            for e in exits
            if e.get("returncode") != -9
        ],  # fmt: skip
        "gave_up": [e["peer"] for e in events if e.get("kind") == "gave_up"],
    }


def left_behind(seen: dict[int, int], grace: float = 10.0) -> list[dict[str, Any]]:
    """Processes of the run still alive after the launcher ended; each gets SIGKILL."""
    deadline = time.time() + grace
    alive = dict(seen)
    while alive and time.time() < deadline:
        alive = {p: s for p, s in alive.items() if (st := proc_stat(p)) and st[2] == s
                 and st[0] not in "ZX"}  # fmt: skip
        if alive:
            time.sleep(0.5)
    out = []
    for pid in alive:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        out.append({"pid": pid, "cmdline": cmd})
    return out


# -- output ---------------------------------------------------------------------------------------
def write_csv(path: Path, minutes: list[dict[str, Any]], peers: int) -> None:
    names = [f"peer-{i}" for i in range(peers)]
    head = ["minute", "t_s", "load_1m", "live", "paused", "rss_median_mb", "rss_max_mb",
            "fds_median", "fds_max", "launcher_rss_mb", "launcher_fds"]  # fmt: skip
    for n in names:
        head += [f"{n}_pid", f"{n}_rss_mb", f"{n}_fds", f"{n}_step", f"{n}_state"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in minutes:
            row = [r[k] for k in head[:11]]
            for n in names:
                p = r["peers"].get(n, {})
                row += [p.get("pid"), p.get("rss_mb"), p.get("fds"), p.get("step"), p.get("state")]
            w.writerow(["" if v is None else round(v, 2) if isinstance(v, float) else v
                        for v in row])  # fmt: skip


def tables(r: dict[str, Any]) -> list[str]:
    curve = markdown_table(
        ["minute", "load", "live peers", "paused", "RSS median (MB)", "RSS max (MB)",
         "fds median", "fds max", "launcher RSS (MB)", "launcher fds"],
        [[m["minute"], fmt(m["load_1m"], ".1f"), m["live"], m["paused"],
          fmt(m["rss_median_mb"], ".0f"),
          fmt(m["rss_max_mb"], ".0f"), fmt(m["fds_median"], ".0f"), fmt(m["fds_max"], ".0f"),
          fmt(m["launcher_rss_mb"], ".0f"), fmt(m["launcher_fds"], ".0f")] for m in r["curves"]],
    )  # fmt: skip
    f, d, c, rs = r["flat"], r["deadlocks"], r["checkpoints"], r["restarts"]
    met = r["targets_met"]

    def yes(v: bool | None) -> str:
        return "n/a" if v is None else ("yes" if v else "**no**")

    cfg = r["config"]
    summary = markdown_table(
        ["measure", "target", "result", "met?"],
        [
            ["peer RSS, median across peers: slope over the second half",
             f"<= {cfg['rss_slope_max']:g} MB/min",
             f"{fmt(f['rss_median_mb_slope_per_min'], '+.2f')} MB/min (max across peers "
             f"{fmt(f['rss_max_mb_slope_per_min'], '+.2f')}); after minute "
             f"{f['warmup_minutes']:g}: spread "
             f"{fmt(f['rss_median_mb_spread_after_warmup'], '.1f')} MB",
             yes(met["rss_flat"])],
            ["open fds, median across peers: slope over the second half",
             f"<= {cfg['fd_slope_max']:g} fds/min",
             f"{fmt(f['fds_median_slope_per_min'], '+.2f')} fds/min (max across peers "
             f"{fmt(f['fds_max_slope_per_min'], '+.2f')}); after minute "
             f"{f['warmup_minutes']:g}: spread {fmt(f['fds_median_spread_after_warmup'], '.0f')}",
             yes(met["fds_flat"])],
            [f"deadlocks (no step for {cfg['stall_minutes']:g} min, neither paused nor dead)",
             "0", f"{d['count']} (live {d['live']}, after the run {d['after']}); longest "
             f"stretch without a step {fmt(d['longest_no_step_s'], '.1f')} s",
             yes(met["no_deadlocks"])],
            ["lost checkpoints", "0",
             f"{c['lost']} of {c['files']} files; {rs['not_resumed']} of {rs['restarts']} "
             "restarts trained without resuming", yes(met["no_lost_checkpoints"])],
            ["processes left after the run", "0", str(len(r["left_behind"])),
             yes(met["nothing_left"])],
        ],
    )  # fmt: skip
    fc = r["faults"]
    status = ", ".join(f"{k}: {v}" for k, v in r["final_status"].items())
    facts = markdown_table(
        ["run", "value"],
        [
            ["faults applied", ", ".join(f"{k} {v}" for k, v in fc["applied"].items()) or "none"],
            ["faults skipped (peer not running) / failed",
             f"{sum(fc['skipped'].values())} / {fc['failed']}"],
            ["restarts (launcher)", str(rs["restarts"])],
            ["exits / crashes (exit not by SIGKILL)", f"{fc['exits']} / {len(fc['crashes'])}"],
            ["final status (summary.json)", status],
            ["launcher", f"exit {r['launcher']['returncode']}, {r['launcher']['wall_s']:.0f} s"],
            ["step source (live)", ", ".join(r["deadlocks"]["step_sources"]) or "-"],
            ["report.json invariants", ", ".join(f"{k} {'ok' if v else 'not ok'}"
                                                 for k, v in r["report_invariants"].items())
             + " (converged needs finished peers; a soak stops them)"],
        ],
    )  # fmt: skip
    return [curve, summary, facts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 minutes, 4 peers, faster faults")
    p.add_argument("--minutes", type=float, help="how long to soak (default 30)")
    p.add_argument("--peers", type=int, help="peers (default 8)")
    p.add_argument("--data", default=None, help=f"MNIST folder (e.g. {DEFAULT_MNIST}); "
                   "default: the bundled data set")  # fmt: skip
    p.add_argument("--fault-minutes", type=float, help="each peer's mean time between faults")
    p.add_argument("--pause-seconds", type=float, help="SIGSTOP to SIGCONT (default 10)")
    p.add_argument("--checkpoint-seconds", type=float, help="checkpoint period (default 5)")
    p.add_argument("--stall-minutes", type=float, help="no step this long is a deadlock (3)")
    p.add_argument("--warmup-minutes", type=float, help="left out of the spread (default 5)")
    p.add_argument("--rss-slope-max", type=float, help="flat RSS: MB/min at most (default 1)")
    p.add_argument("--fd-slope-max", type=float, help="flat fds: fds/min at most (default 0.2)")
    p.add_argument("--chaos-seed", type=int, help="seed of the random faults (default 0)")
    p.add_argument("--run-dir", type=Path, help="default runs/soak-<date-time>")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--csv", type=Path, help="also write the curves here")
    p.add_argument("local_flags", nargs="*", help="more `gossip-train local` flags, after --")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cfg = QUICK if args.quick else SoakConfig()
    flags = (
        "minutes",
        "peers",
        "data",
        "fault_minutes",
        "pause_seconds",
        "checkpoint_seconds",
        "stall_minutes",
        "warmup_minutes",
        "rss_slope_max",
        "fd_slope_max",
        "chaos_seed",
    )
    for key in flags:
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    cfg = replace(cfg, extra=tuple(args.local_flags))
    if cfg.data and not Path(cfg.data).is_dir():
        sys.exit(f"soak.py: MNIST folder {cfg.data} not found (see --data)")
    run_dir = (args.run_dir or REPO / "runs" / time.strftime("soak-%Y%m%d-%H%M%S")).resolve()
    if run_dir.exists():
        sys.exit(f"soak.py: {run_dir} exists; give a new --run-dir")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    running = start_local(run_dir, launcher_args(cfg), interval=None)
    log.info("soak: %g min, %d peers, a fault per peer every ~%g min (kill and pause every "
             "%.0f s each), run dir %s", cfg.minutes, cfg.peers, cfg.fault_minutes,
             fault_interval(cfg), run_dir)  # fmt: skip
    watch = Watch(run_dir, running, cfg)
    try:
        watch_run(watch)
        launch = running.wait(timeout=60, check=False)
    except BaseException:
        running.stop()
        raise
    finally:
        left = left_behind(watch.seen)
        for item in left:
            log.error("left running after the launcher ended, killed: %s", item)
    summary = launch.summary
    after = stalls_after(run_dir, summary, cfg)
    longest = max((after.get("longest_no_step_s") or {}).values(), default=None)
    deadlocks = {
        "live": len(watch.stalls),
        "after": len(after.get("stalls", [])) if after["source"] else None,
        "live_stalls": watch.stalls,
        "after_stalls": after.get("stalls"),
        "longest_no_step_s": longest,
        "longest_no_step_by_peer_s": after.get("longest_no_step_s"),
        "step_sources": sorted(watch.sources),
    }
    deadlocks["count"] = max(deadlocks["live"], deadlocks["after"] or 0)
    flat = flatness(watch.minutes, cfg)
    ckpt = checkpoint_check(run_dir)
    restarts = restart_check(summary, run_dir)
    statuses_ = {}
    for peer in summary["peers"]:
        statuses_[peer["status"]] = statuses_.get(peer["status"], 0) + 1
    report = read_report(run_dir)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "command": command_line(),
        "machine": {
            **machine,
            "loadavg_at_end": list(os.getloadavg()),
            "commit_at_end": code_version(),
        },  # fmt: skip
        "config": asdict(cfg),
        "launcher_command": " ".join(running.argv[2:]),
        "run_dir": str(run_dir),
        "launcher": {"returncode": launch.returncode, "wall_s": launch.exit_s},
        "curves": watch.minutes,
        "flat": flat,
        "deadlocks": deadlocks,
        "checkpoints": ckpt,
        "restarts": restarts,
        "faults": fault_counts(summary),
        "final_status": statuses_,
        "peers": [
            {k: p.get(k) for k in ("name", "status", "steps", "exchanges", "restarts")}
            for p in summary["peers"]
        ],  # fmt: skip
        # The launcher's report.json after a run with faults. "converged" needs finished
        # peers; a soak stops its peers by --timeout ("stopped"), so it has none to check.
        "report_invariants": {
            k: v.get("ok") for k, v in (report or {}).get("invariants", {}).items()
        },
        "left_behind": left,
    }
    result["targets_met"] = {
        "rss_flat": flat["rss_flat"],
        "fds_flat": flat["fds_flat"],
        "no_deadlocks": deadlocks["count"] == 0,
        "no_lost_checkpoints": ckpt["lost"] == 0 and restarts["not_resumed"] == 0,
        "nothing_left": not left,
    }
    write_csv(args.csv or run_dir / "curves.csv", watch.minutes, cfg.peers)
    if args.csv is not None:
        write_csv(run_dir / "curves.csv", watch.minutes, cfg.peers)
    (run_dir / "soak.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    emit(result, tables(result), args.json)
    log.info("run dir: %s (soak.json, curves.csv)", run_dir)


if __name__ == "__main__":
    main()
