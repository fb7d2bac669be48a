"""Shared pieces of the benchmark scripts: paths, timing summaries, output, helper processes,
the one launcher of ``gossip-train local`` runs and the readers of what they leave behind.

Every benchmark prints one JSON object (machine-readable, with the machine it ran on) and
then a markdown table (for docs/). Helper processes announce themselves with one stdout
line ``READY <address>``; the parent reads it under a deadline so a helper that dies or
hangs at start-up fails the benchmark instead of stalling it. Workers end with one line
``RESULT <json>`` (``print_result``), which the parent reads with ``read_result``.

``launch_local`` (or ``start_local`` for a run to act on while it goes) starts
``python -m trainer.cli local`` with a ``Watcher`` thread that notes when the run dir
appears and samples every peer from /proc; ``read_summary``, ``read_progress``,
``read_report`` and ``read_peers`` read RUN_DIR/summary.json, progress.jsonl, report.json
and peers.json. ``GossipBenchConfig`` and ``measure_main`` are what the training measures
(tta.py, straggler.py, overhead.py, startup.py, memory.py) share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/X.py` puts benchmarks/ first on sys.path, not the repository, so
# `import trainer` in a script or worker would find whichever checkout the venv's editable
# install points at (another worktree, say), not the code next to it. Scripts import common
# before any project package.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))
BENCH_DIR = REPO / "benchmarks"
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
READY = "READY"


def command_line() -> str:
    """How this benchmark was started, interpreter flags included."""
    flags = ["-O"] if sys.flags.optimize else []
    return " ".join([Path(sys.executable).name, *flags, *sys.argv])


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; benchmark results mean nothing without it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": code_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def code_version() -> str:
    """The commit measured, with "+dirty" when the code under test differs from it.

    Several people change this working tree at once: the commit alone does not say what ran.
    """
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "p2p", "gossip", "trainer")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class Summary:
    n: int  # number of timed repetitions
    median: float  # seconds
    best: float  # seconds, the fastest repetition
    worst: float  # seconds, the slowest repetition

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "median_s": self.median, "best_s": self.best, "worst_s": self.worst}


def summarize(seconds: Sequence[float]) -> Summary:
    if not seconds:
        raise ValueError("summarize: no timings")
    return Summary(len(seconds), statistics.median(seconds), min(seconds), max(seconds))


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def paired_ratios(
    reps: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """``time_to_target_s`` of a over b for each (a, b), paired within each rep, and the
    median of the pairs; a pair is left out where either run missed the target."""
    out = {}
    for a, b in pairs:
        if a not in reps or b not in reps:
            continue
        each = [
            ra["time_to_target_s"] / rb["time_to_target_s"]
            for ra, rb in zip(reps[a], reps[b], strict=True)
            if ra["time_to_target_s"] and rb["time_to_target_s"]
        ]
        out[f"{a} / {b}"] = {"median": median(each), "each": each}
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(result: dict[str, Any], tables: Sequence[str], json_path: Path | None = None) -> None:
    """Print the JSON object, then the tables; optionally also write the JSON to a file."""
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    print()
    for table in tables:
        print(table)
        print()
    if json_path is not None:
        json_path.write_text(text + "\n")


def add_max_seconds(parser: argparse.ArgumentParser) -> None:
    """A worker's wall budget: its ranks stop, with an evaluation, once it is spent."""
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="stop, with an evaluation, once this many seconds since --launch have passed "
        "(0: no limit); the curve says how far it got",
    )


def python_cmd() -> list[str]:
    """This interpreter, with this run's -O flag passed on to the helper."""
    return [sys.executable, *(["-O"] if sys.flags.optimize else [])]


def mb_per_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The address in the ``READY <addr>`` line a helper prints; RuntimeError if none comes."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                return line.split(maxsplit=1)[1].strip()
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"helper {proc.args!r} did not start (exit {proc.poll()})")


def read_result(out: str) -> dict[str, Any] | None:
    """The JSON of the ``RESULT <json>`` line a worker printed, or None if it printed none."""
    for line in out.splitlines():
        if line.startswith("RESULT "):
            found: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return found
    return None


def run_ranks(
    cmds: Sequence[Sequence[str]],
    env: dict[str, str],
    deadline: float,
    parse: Callable[[str, int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Start one process per command (rank order), wait for all until ``deadline``
    (time.time()), and return ``parse(stdout, rank)`` of each; any failure kills the rest."""
    procs = [
        subprocess.Popen(list(cmd), cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
        for cmd in cmds
    ]
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
            if proc.returncode != 0:
                raise RuntimeError(f"rank {rank}/{len(procs)} exited with {proc.returncode}")
            results.append(parse(out, rank))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


class Helper:
    """A helper process started with ``python <script> <args>`` that prints ``READY <addr>``."""

    def __init__(self, script: str, args: Sequence[str], ready_timeout: float = 60.0) -> None:
        cmd = [*python_cmd(), str(BENCH_DIR / script), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.addr = self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> str:
        return wait_ready(self.proc, timeout)

    def stop(self, timeout: float = 10.0) -> str:
        """Close its stdin (the helper exits on EOF), then escalate to kill; return its output."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=timeout)
        except ValueError:  # already stopped: its pipes are closed
            out = ""
        return out or ""

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def announce(addr: str) -> None:
    """Helper side: tell the parent where we listen."""
    print(f"{READY} {addr}", flush=True)


def print_result(result: dict[str, Any]) -> None:
    """Worker side: the one ``RESULT <json>`` line its parent reads with ``read_result``."""
    print("RESULT " + json.dumps(result), flush=True)


def require_result(out: str, who: str) -> dict[str, Any]:
    """``read_result`` of a worker that must have printed one; RuntimeError if it did not."""
    found = read_result(out)
    if found is None:
        raise RuntimeError(f"{who} printed no result")
    return found


def read_until(proc: subprocess.Popen[str], prefix: str, timeout: float, who: str) -> str:
    """The rest of the first stdout line of ``proc`` that starts with ``prefix``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix) :]
    raise RuntimeError(f"{who} printed no {prefix.strip()} (exit {proc.poll()})")


def load_now() -> float:
    return os.getloadavg()[0]


def fmt(v: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


# -- what `gossip-train local` leaves in its run dir --------------------------------------------
def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_summary(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/summary.json, written by the launcher when the run ends."""
    found: dict[str, Any] = read_json(run_dir / "summary.json")
    return found


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/report.json (written after runs with faults or a baseline), or None."""
    path = run_dir / "report.json"
    return read_json(path) if path.is_file() else None


def read_progress(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """RUN_DIR/progress.jsonl (every peer's progress lines, written at the end), by peer."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in (run_dir / "progress.jsonl").read_text().splitlines():
        ev = json.loads(line)
        out.setdefault(ev["peer"], []).append(ev)
    return out


def read_peers(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/peers.json's peers (name, index, addr, pid: None while one is down), rewritten
    by the launcher at every (re)start; [] before it exists or while it is being replaced."""
    try:
        return list(read_json(run_dir / "peers.json")["peers"])
    except (OSError, ValueError, KeyError):
        return []


# -- the configuration the training measures share ----------------------------------------------
@dataclass(frozen=True)
class BaselineConfig:
    """baselines.py: one process and DDP (gloo); also the reference runs of tta and straggler."""

    # MNIST folder (IDX files, plain, .gz or split .gz.partN).
    data: str = str(DEFAULT_MNIST)
    # Test accuracy to reach; the target for the seed MLP.
    target: float = 0.975
    # Give up after this many epochs; the seed MLP needs about 4 in one process.
    max_epochs: float = 20.0
    # Rank 0 evaluates every this many epochs (an epoch is one pass over all shards).
    eval_every: float = 0.25
    # Worker counts for time to accuracy; 1 means one plain process, no DDP.
    worlds: tuple[int, ...] = (1, 2, 4)
    # Use only the first N training samples (0: all 60,000); --quick uses a subset.
    subset: int = 0
    # Straggler runs: timed steps per worker, after untimed warm-up steps.
    steps: int = 600
    warmup_steps: int = 50
    # Straggler runs: the slowed rank sleeps this many times its compute time per step.
    slowdown: float = 3.0
    # Deadline for one launch (all its workers); a hung rendezvous fails the benchmark.
    timeout: float = 900.0


BASELINE_QUICK = BaselineConfig(
    max_epochs=0.5, subset=4096, steps=30, warmup_steps=5, timeout=300.0
)

# Training-set sizes, to turn --eval-every into "4 times per local epoch" without loading data.
TRAIN_SIZE = {"mnist": 60_000, "fashion-mnist": 60_000, "default": 12_000}


@dataclass(frozen=True)
class GossipBenchConfig:
    """tta.py, straggler.py, overhead.py, startup.py and memory.py (each uses its part)."""

    # Data set for everything but memory: "mnist" (from ``data``) or "default" (bundled).
    dataset: str = "mnist"
    # MNIST folder (IDX files, plain, .gz or split .gz.partN).
    data: str = str(DEFAULT_MNIST)
    # Test accuracy every peer must reach; the target for the seed MLP.
    target: float = 0.975
    # Interleaved repetitions of each measure; medians are reported.
    reps: int = 3
    # Peer counts for time to accuracy.
    tta_peers: tuple[int, ...] = (2, 4)
    # Local epochs each peer trains in a tta run; the run is not stopped at the target, so
    # this only bounds it (one process needs ~4 epochs of the whole set).
    tta_epochs: float = 8.0
    # Evaluations per local epoch (baselines.py evaluates every 0.25 epoch too).
    evals_per_epoch: int = 4
    # Run one process and DDP x2/x4 between the gossip runs (same load, fair ratios).
    with_baselines: bool = True
    # An interpreter that can import hivemind (kept out of the project's venv); "" means
    # this one. Without hivemind, its rows are skipped with a note.
    hivemind_python: str = ""
    # hivemind.Optimizer with local updates (the closest to gossip: every peer steps on its
    # own, parameters are averaged in the background), averaging once every peer has done
    # this many local steps (target_batch_size = 32 x peers x this). Not 20 like gossip's
    # period: a round takes at least the matchmaking time, 3 s (its docs' value for small
    # local runs), and the next step waits for it; at 20 steps a peer trained ~0.1% of the
    # time (measured: 11 CPU s in 8 minutes). 500 steps is ~0.5-2 s of training here.
    hivemind_steps_between_averages: int = 500
    hivemind_matchmaking_time: float = 3.0
    # A hivemind run that has not reached the target by then is recorded as not reached.
    hivemind_timeout: float = 300.0
    # Straggler: peers, local epochs, and the slowed peer's factor (4 = a quarter speed).
    # Enough epochs that the window in which all four train spans several progress events
    # (every 0.5 s) on a quiet box: 2 epochs gave windows of 0.7-1.6 s.
    straggler_peers: int = 4
    straggler_epochs: float = 6.0
    slowdown: float = 4.0
    # Overhead: local epochs of each of the 2 peers (6: a window of ~5 s on a quiet box).
    overhead_epochs: float = 6.0
    # Start-up: peers launched, local epochs, and linger. Only the first exchange matters,
    # but every peer joins through peer-0, which must still be there when the last one
    # (slow to start under load) joins, or that peer fails the run.
    startup_peers: int = 8
    startup_epochs: float = 1.0
    startup_linger: float = 5.0
    # Memory: hidden width of the large MLP (784-H-10; 12,500 gives 9.94M parameters),
    # steps between exchanges and local epochs of each of its 2 peers (bundled data set).
    big_hidden: int = 12_500
    memory_period: int = 5
    memory_epochs: float = 0.3
    # Deadline for one launcher run; a hung run fails the benchmark instead of stalling it.
    timeout: float = 900.0
    # baselines.py settings for the reference runs.
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


GOSSIP_QUICK = GossipBenchConfig(
    dataset="default",
    target=0.85,
    reps=1,
    tta_peers=(2,),
    tta_epochs=1.0,
    straggler_epochs=20.0,
    overhead_epochs=10.0,
    startup_peers=4,
    big_hidden=2_000,
    timeout=300.0,
    baseline=BASELINE_QUICK,
)


def common_args(cfg: GossipBenchConfig, peers: int, epochs: float) -> list[str]:
    """`gossip-train local` flags of every training measure's runs."""
    args = ["--peers", str(peers), "--epochs", str(epochs), "--threads", "1"]
    args += ["--dataset", cfg.dataset]
    if cfg.dataset != "default":
        args += ["--data-dir", cfg.data]
    return args


def steps_per_epoch(cfg: GossipBenchConfig, peers: int, batch: int = 32) -> int:
    return math.ceil(TRAIN_SIZE[cfg.dataset] / peers / batch)


class Runs:
    """Names and holds the run dirs of one benchmark invocation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def next(self, label: str) -> Path:
        self.count += 1
        return self.root / f"{self.count:03d}-{label}"


# -- driving `gossip-train local` ---------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    at: float  # time.time() of the sample
    peer: str
    pid: int
    cpu_s: float  # user + system CPU seconds of the process so far
    rss: int  # bytes
    hwm: int  # peak RSS so far, bytes
    loop_cpu_s: float  # CPU seconds of the main thread alone: the peer's event loop


def cpu_seconds(stat_path: str) -> float:
    """utime + stime from a /proc .../stat file (fields 14 and 15, after "pid (comm)")."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_proc(pid: int) -> tuple[float, int, int, float] | None:
    """CPU seconds, RSS, peak RSS and main-thread CPU of a live process; None once gone."""
    try:
        cpu = cpu_seconds(f"/proc/{pid}/stat")
        loop_cpu = cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError, ValueError):
        return None
    mem = {}
    for line in status.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            mem[line[:5]] = int(line.split()[1]) * 1024
    return cpu, mem.get("VmRSS", 0), mem.get("VmHWM", 0), loop_cpu


class Watcher(threading.Thread):
    """Notes when the launcher creates its run dir, then samples its peers from /proc
    (every ``interval`` seconds; never with ``interval=None``)."""

    def __init__(self, run_dir: Path, launched: float, interval: float | None = 0.2) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.launched, self.interval = run_dir, launched, interval
        self.offset: float | None = None
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.offset is None:
            if self.run_dir.exists():
                self.offset = time.time() - self.launched
            else:
                time.sleep(0.005)
        if self.interval is None:
            return
        while not self.done.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for p in read_peers(self.run_dir):
            if not p.get("pid"):
                continue
            got = read_proc(p["pid"])
            if got is not None:
                self.samples.append(Sample(time.time(), p["name"], p["pid"], *got))


@dataclass
class Launch:
    """One finished `gossip-train local` run."""

    run_dir: Path
    launched: float  # time.time() just before the launcher process was started
    offset: float  # seconds from launch to the launcher's clock zero
    exit_s: float  # seconds from launch to the launcher's exit
    summary: dict[str, Any]
    samples: list[Sample]
    returncode: int = 0  # the launcher's exit status

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.summary["events"] if e.get("kind") == kind]

    def since_launch(self, t: float) -> float:
        return self.offset + t

    def progress(self) -> dict[str, list[dict[str, Any]]]:
        return read_progress(self.run_dir)

    def report(self) -> dict[str, Any] | None:
        return read_report(self.run_dir)


class Running:
    """A `gossip-train local` run in progress; its output goes to RUN_DIR.out."""

    def __init__(self, run_dir: Path, args: Sequence[str], interval: float | None = 0.2) -> None:
        self.run_dir = run_dir
        self.argv = [*python_cmd(), "-m", "trainer.cli", "local", "--run-dir", str(run_dir)]
        self.argv += ["--no-progress", *args]
        self.out_path = run_dir.with_suffix(".out")
        log.info("run: %s", " ".join(self.argv[2:]))
        with open(self.out_path, "w") as out:
            self.launched = time.time()
            self.watcher = Watcher(run_dir, self.launched, interval)
            self.watcher.start()
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float, check: bool = True) -> Launch:
        """Wait for the launcher's end; its Launch, or RuntimeError if it hung, wrote no
        summary or (with ``check``) exited non-zero. A run stopped by its --timeout exits 1
        (its peers end "stopped"), so runs meant to end that way pass ``check=False``."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"{self.run_dir.name}: no end within {timeout:.0f} s") from None
        finally:
            self.watcher.done.set()
            self.watcher.join(timeout=5)
        exit_s = time.time() - self.launched
        offset = self.watcher.offset
        if (check and rc != 0) or offset is None or not (self.run_dir / "summary.json").exists():
            raise RuntimeError(f"{self.run_dir.name}: launcher exited with {rc}: {self.tail()}")
        summary = read_summary(self.run_dir)
        samples = self.watcher.samples
        return Launch(self.run_dir, self.launched, offset, exit_s, summary, samples, rc)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the launcher stops its peers on it; it writes no summary then), and
        SIGKILL if it has not ended within ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.watcher.done.set()

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def start_local(run_dir: Path, args: Sequence[str], interval: float | None = 0.2) -> Running:
    """Start ``gossip-train local --run-dir RUN_DIR --no-progress ARGS``; see ``Running``."""
    return Running(run_dir, args, interval)


def launch_local(run_dir: Path, args: Sequence[str], timeout: float) -> Launch:
    """Run ``gossip-train local`` to its end; its output goes to RUN_DIR.out."""
    return start_local(run_dir, args).wait(timeout)


# -- windows over progress events -------------------------------------------------------------
def interp(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of sorted (x, y) points at x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def training_window(run: Launch, start_after: float = 0.0) -> tuple[float, float]:
    """From the moment every peer trains to the moment the first one ends its training."""
    start = max([e["t"] for e in run.events("started")] + [start_after])
    ends = []
    for points in run.progress().values():
        done = [p["t"] for p in points if p["step"] >= p["total"]]
        ends.append(min(done) if done else points[-1]["t"])
    return start, min(ends)


def peer_rates(run: Launch, window: tuple[float, float]) -> dict[str, dict[str, float | None]]:
    """Per peer, inside the window: steps/s, and CPU seconds per step from /proc samples."""
    t0, t1 = window
    out: dict[str, dict[str, float | None]] = {}
    for peer, points in run.progress().items():
        mine = [s for s in run.samples if s.peer == peer]
        at = [s.at - run.launched - run.offset for s in mine]  # on the launcher's clock
        # Inside the window, and inside the span the /proc samples cover (they start once
        # peers.json names the peer), so steps and CPU are counted over the same time.
        lo, hi = max([t0, *at[:1]]), min([t1, *at[-1:]])
        steps = [(p["t"], float(p["step"])) for p in points]
        inside = [s for s in steps if lo <= s[0] <= hi]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            out[peer] = {"steps_per_s": None, "cpu_per_step_ms": None, "steps": 0}
            continue
        (a_t, a_s), (b_t, b_s) = inside[0], inside[-1]
        cpu = list(zip(at, [s.cpu_s for s in mine], strict=True))
        loop = list(zip(at, [s.loop_cpu_s for s in mine], strict=True))
        out[peer] = {
            "steps_per_s": (b_s - a_s) / (b_t - a_t),
            "cpu_per_step_ms": per_step_ms(cpu, (a_t, a_s), (b_t, b_s)),
            "loop_cpu_per_step_ms": per_step_ms(loop, (a_t, a_s), (b_t, b_s)),
            "steps": b_s - a_s,
        }
    return out


def per_step_ms(
    cpu: list[tuple[float, float]], a: tuple[float, float], b: tuple[float, float]
) -> float | None:
    """CPU milliseconds per step between two (time, step) points, from (time, CPU) samples."""
    c0, c1 = interp(cpu, a[0]), interp(cpu, b[0])
    return 1e3 * (c1 - c0) / (b[1] - a[1]) if c0 is not None and c1 is not None else None


# -- the main of a training measure -------------------------------------------------------------
def measure_main(
    name: str,
    doc: str,
    measure: Callable[[GossipBenchConfig, Runs], dict[str, Any]],
    table: Callable[[dict[str, Any], GossipBenchConfig], str],
    *,
    uses_dataset: bool = True,
    uses_baselines: bool = False,
    hivemind: bool = False,
    repeats: bool = True,
) -> None:
    """Flags, config, run dirs and output of tta.py, straggler.py, overhead.py, startup.py
    and memory.py: the JSON (``name`` holds the measure's result) and its table.

    ``uses_dataset``: its runs train on ``cfg.dataset`` (MNIST unless --quick), else on the
    bundled set; ``uses_baselines``: it runs baselines.py's references (--no-baselines
    skips them); ``hivemind``: it takes --hivemind-python; ``repeats``: it takes --reps.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run, bundled data")
    if repeats:
        parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3)")
    if uses_dataset or uses_baselines:
        parser.add_argument("--data", default="", help=f"MNIST folder (default {DEFAULT_MNIST})")
    if uses_baselines:
        parser.add_argument("--no-baselines", action="store_true", help="gossip runs only")
    if hivemind:
        parser.add_argument(
            "--hivemind-python", default="", help="interpreter with hivemind (default: this one)"
        )
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs here (else temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    cfg = GOSSIP_QUICK if args.quick else GossipBenchConfig()
    if getattr(args, "reps", 0):
        cfg = replace(cfg, reps=args.reps)
    if not uses_baselines or args.no_baselines:
        cfg = replace(cfg, with_baselines=False)
    if hivemind and args.hivemind_python:
        cfg = replace(cfg, hivemind_python=args.hivemind_python)
    if getattr(args, "data", ""):
        cfg = replace(cfg, data=args.data, baseline=replace(cfg.baseline, data=args.data))
    # MNIST must be there for a full run, and for the baselines even in a quick one.
    needs_mnist = (uses_dataset and cfg.dataset != "default") or cfg.with_baselines
    if needs_mnist and not Path(cfg.data).is_dir():
        sys.exit(f"{name}.py: MNIST folder {cfg.data} not found (see --data)")
    work = args.keep or Path(tempfile.mkdtemp(prefix=f"gossip-bench-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": name,
        "command": command_line(),
        "machine": machine_info(),
        "config": asdict(cfg),
    }
    try:
        result[name] = measured = measure(cfg, Runs(work))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["machine"]["commit_at_end"] = code_version()  # others may change the tree meanwhile
    emit(result, [f"### {name}\n\n{table(measured, cfg)}"], args.json)


def run_keyring(run_dir: Path) -> Any:
    """The keyring a `gossip-train local` run made for its peers (RUN_DIR/secret): what a
    benchmark needs to ask them for their status. None if the run has none."""
    from p2p.secure import Keyring

    path = Path(run_dir) / "secret"
    return Keyring.from_file(path) if path.is_file() else None
