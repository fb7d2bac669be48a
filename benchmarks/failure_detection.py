"""How fast do training peers on 127.0.0.1 find a SIGKILLed peer?

Starts ``--peers`` real peer processes (``python -m trainer.cli peer``, the bundled data set,
one torch thread each, membership profile ``--profile``), waits until every peer sees all
the others alive and is training, then kills one with SIGKILL and waits until every survivor
emits ``declared_dead`` for it. The victim is replaced by a fresh peer (new name, same data
partition) that joins through the survivors, the group settles, and the next peer is killed:
``--kills`` rounds, each victim a different process (the originals in order p0, p1, ...,
then the replacements).

Measured per kill and per survivor, from the moment of the kill (wall clock, the same
machine, so the peers' event timestamps compare directly):

- detection: the survivor's ``declared_dead`` event for the victim (and whether its own
  suspicion timer ran out, or it heard the verdict from someone else);
- first suspicion: the survivor's first ``suspect`` event for the victim.

Any ``declared_dead`` for a peer that was never killed is a false death and is reported.

Run: .venv/bin/python benchmarks/failure_detection.py [--quick] [--peers 5] [--kills 5]
     [--profile local] [--json out.json]
Every process it starts is killed when it ends, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO, command_line, emit, machine_info, markdown_table

log = logging.getLogger(__name__)

Event = dict[str, Any]

# Seconds a peer may take to print "listening" (torch import on a loaded 2-core machine).
START_TIMEOUT = 90.0
# Seconds for every peer to see all the others alive after a start or a replacement.
MEET_TIMEOUT = 120.0
# Clock ticks per second of /proc/<pid>/stat CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def finite(x: float) -> float | None:
    """A number for JSON: NaN (nothing measured) becomes null."""
    return None if math.isnan(x) else round(x, 3)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, min, median, p90, max of a list of seconds (null when empty)."""
    return {
        "n": len(values),
        "min_s": finite(min(values)) if values else None,
        "median_s": finite(percentile(values, 50)),
        "p90_s": finite(percentile(values, 90)),
        "max_s": finite(max(values)) if values else None,
    }


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime_line() -> str:
    """`uptime` as the shell prints it: the load others' runs put on the shared machine."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


class PeerProcess:
    """One ``trainer.cli peer`` process; a thread collects its JSON events from stdout."""

    def __init__(
        self,
        name: str,
        run_dir: Path,
        index: int,
        num_peers: int,
        join: Sequence[str],
        profile: str,
    ) -> None:
        self.name = name
        self.index = index
        self.events: list[Event] = []
        self.eof = False
        self._cond = threading.Condition()
        self.log_path = run_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "trainer.cli", "peer", "--name", name]
        cmd += ["--listen", "127.0.0.1:0", "--events", "jsonl", "--epochs", "10000"]
        cmd += ["--index", str(index), "--num-peers", str(num_peers), "--threads", "1"]
        cmd += ["--run-dir", str(run_dir / name), "--profile", profile]
        if join:
            cmd += ["--join", ",".join(join)]
        self.cmd = cmd
        with open(self.log_path, "wb") as err:
            # A session of its own: Ctrl-C reaches only the benchmark, which then kills the
            # peers itself (a peer's own SIGINT handling would start a slow graceful leave).
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()
        self.addr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float) -> Event:
        """The first event (already seen or still to come) that matches, within timeout s."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    why = "exited" if self.eof else f"nothing within {timeout:.0f} s"
                    raise TimeoutError(
                        f"{self.name}: no matching event ({why}); see {self.log_path}"
                    )
                self._cond.wait(left)

    def wait_listening(self, timeout: float = START_TIMEOUT) -> str:
        self.addr = self.wait_for(lambda e: e.get("kind") == "listening", timeout)["addr"]
        return self.addr

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def of(self, kind: str, subject: str | None = None, since: float = 0.0) -> list[Event]:
        """Events of one kind (about one subject), stamped at or after ``since``."""
        return [
            e
            for e in self.snapshot()
            if e.get("kind") == kind
            and (subject is None or e.get("subject") == subject)
            and e.get("ts", 0.0) >= since
        ]

    def last_progress(self, since: float = 0.0) -> Event | None:
        progress = self.of("progress", since=since)
        return progress[-1] if progress else None

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (NaN once the process is gone)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL; returns the wall-clock time of the kill."""
        t = time.time()
        if self.running():
            self.proc.kill()
        return t

    def close(self) -> None:
        if self.running():
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit after SIGKILL", self.name, self.proc.pid)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Group:
    """Peer processes started for one benchmark; close() kills every one of them."""

    def __init__(self, run_dir: Path, num_peers: int, profile: str) -> None:
        self.run_dir = run_dir
        self.num_peers = num_peers
        self.profile = profile
        self.all: list[PeerProcess] = []  # every process ever started, for cleanup
        self.live: list[PeerProcess] = []  # the current members (not killed)

    def start(self, names: Sequence[tuple[str, int]], join: Sequence[str]) -> list[PeerProcess]:
        """Start peers (name, partition index) joining through ``join``; wait for "listening"."""
        started = []
        for name, index in names:
            p = PeerProcess(name, self.run_dir, index, self.num_peers, join, self.profile)
            self.all.append(p)
            started.append(p)
        for p in started:
            p.wait_listening()
            self.live.append(p)
        return started

    def start_all(self) -> None:
        """The first peer alone, then the rest joining through it, all at once."""
        (seed,) = self.start([("p0", 0)], [])
        self.start([(f"p{i}", i) for i in range(1, self.num_peers)], [seed.addr])

    def wait_met(self, since: float, timeout: float = MEET_TIMEOUT) -> float:
        """Wait until every live peer reports (in progress after ``since``) all others alive
        and is training; returns the seconds it took."""
        want = len(self.live) - 1
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            lasts = [p.last_progress(since) for p in self.live]
            if all(e is not None and e.get("alive") == want for e in lasts):
                return time.monotonic() - t0
            dead = [p.name for p in self.live if not p.running()]
            if dead:
                raise RuntimeError(f"peers exited before meeting: {dead}")
            time.sleep(0.2)
        seen = {p.name: (p.last_progress(since) or {}).get("alive") for p in self.live}
        raise TimeoutError(f"peers did not all meet within {timeout} s: alive seen {seen}")

    def close(self) -> None:
        for p in self.all:
            p.close()


@contextmanager
def group_of(num_peers: int, profile: str, run_dir: Path | None) -> Iterator[Group]:
    """A Group whose processes die with the benchmark: on return, on error, on Ctrl-C and on
    SIGTERM (turned into SystemExit so that the finally clause runs)."""
    tmp = None
    if run_dir is None:
        tmp = tempfile.mkdtemp(prefix="gossip-bench-")
        run_dir = Path(tmp)
    run_dir.mkdir(parents=True, exist_ok=True)
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    group = Group(run_dir, num_peers, profile)
    try:
        yield group
    finally:
        group.close()
        signal.signal(signal.SIGTERM, old)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- the failure-detection rounds -------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    victim: str  # name of the killed peer
    survivor: str  # name of the peer that declared it dead
    detect_s: float  # seconds from SIGKILL to the survivor's declared_dead (NaN: never)
    suspect_s: float  # seconds from SIGKILL to its first suspect event (NaN: none seen)
    own_timer: bool  # its own suspicion timer ran out (False: it heard the verdict)


def kill_round(group: Group, victim: PeerProcess, timeout: float) -> tuple[list[Detection], dict]:
    """SIGKILL ``victim``; wait until every survivor declares it dead (or ``timeout`` s)."""
    survivors = [p for p in group.live if p is not victim]
    load = load_now()
    t_kill = victim.kill()
    group.live.remove(victim)
    found: list[Detection] = []
    missing = []
    for s in survivors:
        left = max(0.5, timeout - (time.time() - t_kill))

        def verdict(e: Event) -> bool:
            return e.get("kind") == "declared_dead" and e.get("subject") == victim.name

        try:
            ev = s.wait_for(verdict, left)
        except TimeoutError:
            missing.append(s.name)
            ev = None
        suspects = s.of("suspect", victim.name, since=t_kill)
        found.append(
            Detection(
                victim=victim.name,
                survivor=s.name,
                detect_s=ev["ts"] - t_kill if ev else math.nan,
                suspect_s=suspects[0]["ts"] - t_kill if suspects else math.nan,
                own_timer=bool(ev and ev.get("by") == s.name),
            )
        )
    info = {
        "victim": victim.name,
        "survivors": [s.name for s in survivors],
        "loadavg_at_kill": load,
        "not_detected_within_timeout": missing,
    }
    return found, info


def false_deaths(group: Group, killed: set[str]) -> list[dict[str, Any]]:
    """declared_dead events about peers that were never killed."""
    out = []
    for p in group.all:
        for e in p.of("declared_dead"):
            if e.get("subject") not in killed:
                out.append({"peer": p.name, "subject": e.get("subject"), "ts": e.get("ts")})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    info["uptime_at_start"] = uptime_line()
    detections: list[Detection] = []
    rounds: list[dict[str, Any]] = []
    killed: set[str] = set()
    with group_of(args.peers, args.profile, args.run_dir) as group:
        t_start = time.time()
        group.start_all()
        met_s = group.wait_met(t_start)
        log.info("%d peers met after %.1f s; training", args.peers, met_s)
        time.sleep(args.settle)
        order = list(group.live)  # originals in order, then each replacement once it joins
        for k in range(args.kills):
            victim = order[k]
            found, round_info = kill_round(group, victim, args.timeout)
            killed.add(victim.name)
            detections += found
            times = [d.detect_s for d in found]
            log.info("kill %d (%s): detected in %s s", k + 1, victim.name, times)
            if k + 1 < args.kills:
                t_rep = time.time()
                name = f"p{args.peers + k}"
                (fresh,) = group.start([(name, victim.index)], [p.addr for p in group.live])
                order.append(fresh)
                round_info["replacement"] = name
                round_info["replacement_met_s"] = round(group.wait_met(t_rep), 2)
                time.sleep(args.settle)
            rounds.append(round_info)
        wrong = false_deaths(group, killed)
        running = [p.name for p in group.live if p.running()]
    info["uptime_at_end"] = uptime_line()
    return summarize(args, info, detections, rounds, wrong, running, met_s)


def summarize(
    args: argparse.Namespace,
    info: dict[str, Any],
    detections: list[Detection],
    rounds: list[dict[str, Any]],
    wrong: list[dict[str, Any]],
    running: list[str],
    met_s: float,
) -> dict[str, Any]:
    detect = [d.detect_s for d in detections if not math.isnan(d.detect_s)]
    suspect = [d.suspect_s for d in detections if not math.isnan(d.suspect_s)]
    first_suspect = []
    for r in rounds:
        mine = [d.suspect_s for d in detections if d.victim == r["victim"]]
        mine = [x for x in mine if not math.isnan(x)]
        if mine:
            first_suspect.append(min(mine))
        r["detect_s"] = {
            d.survivor: finite(d.detect_s) for d in detections if d.victim == r["victim"]
        }
        r["first_suspect_s"] = round(min(mine), 3) if mine else None
    within = sum(1 for x in detect if x <= args.target)
    return {
        "benchmark": "failure_detection",
        "command": command_line(),
        "machine": info,
        "params": {
            "peers": args.peers,
            "kills": args.kills,
            "profile": args.profile,
            "settle_s": args.settle,
            "timeout_s": args.timeout,
            "target_s": args.target,
        },
        "initial_meet_s": round(met_s, 2),
        "detection": distribution(detect),
        "first_suspicion_any_survivor": distribution(first_suspect),
        "first_suspicion_per_survivor": distribution(suspect),
        "survivor_verdicts": len(detections),
        "undetected": sum(1 for d in detections if math.isnan(d.detect_s)),
        "within_target": within,
        "target_met": within == len(detections) and bool(detections),
        "own_timer_verdicts": sum(1 for d in detections if d.own_timer),
        "false_deaths": wrong,
        "survivors_running_at_end": running,
        "rounds": rounds,
        "detections": [
            {**d.__dict__, "detect_s": finite(d.detect_s), "suspect_s": finite(d.suspect_s)}
            for d in detections
        ],
    }


def tables(result: dict[str, Any]) -> list[str]:
    rows = []
    for label, key in (
        ("detection (declared_dead), per survivor", "detection"),
        ("first suspicion, per survivor", "first_suspicion_per_survivor"),
        ("first suspicion, earliest survivor per kill", "first_suspicion_any_survivor"),
    ):
        d = result[key]
        cells = [d[k] if d[k] is not None else "-" for k in ("min_s", "median_s", "p90_s", "max_s")]
        rows.append([label, d["n"], *cells])
    dist = markdown_table(["seconds after SIGKILL", "n", "min", "median", "p90", "max"], rows)
    per_kill = []
    for r in result["rounds"]:
        times = sorted(v for v in r["detect_s"].values() if v is not None)
        per_kill.append(
            [
                r["victim"],
                r["first_suspect_s"] if r["first_suspect_s"] is not None else "-",
                ", ".join(f"{t:.2f}" for t in times),
                len(r["not_detected_within_timeout"]),
                " ".join(f"{x:.2f}" for x in r["loadavg_at_kill"]),
            ]
        )
    kills = markdown_table(
        ["victim", "first suspicion (s)", "declared dead by each survivor (s)", "missed", "load"],
        per_kill,
    )
    summary = markdown_table(
        ["verdicts", f"within {result['params']['target_s']} s", "own timer", "false deaths"],
        [
            [
                result["survivor_verdicts"],
                result["within_target"],
                result["own_timer_verdicts"],
                len(result["false_deaths"]),
            ]
        ],
    )
    return [dist, kills, summary]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 peers, 2 kills")
    parser.add_argument("--peers", type=int, default=5, help="peers in the group (default 5)")
    parser.add_argument("--kills", type=int, default=5, help="kill rounds (default 5)")
    parser.add_argument("--profile", default="local", help="membership profile (default local)")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds of training between meeting and kill"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each survivor's verdict"
    )
    parser.add_argument("--target", type=float, default=5.0, help="detection target in seconds")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep peer logs here (temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.peers, args.kills, args.settle = 4, 2, 2.0
    if args.peers < 3 or args.kills < 1:
        parser.error("need --peers >= 3 (two survivors) and --kills >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        result = run(args)
    except KeyboardInterrupt:
        log.warning("interrupted; every peer process it started has been killed")
        sys.exit(130)
    emit(result, tables(result), args.json)


if __name__ == "__main__":
    main()
