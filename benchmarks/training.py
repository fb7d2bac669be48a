"""Training benchmarks, gossip-train side: time to accuracy, straggler, overhead, start-up, memory.

Every measure except the memory stages drives the real command, ``gossip-train local``
(``python -m trainer.cli local``: peers forked from the pre-loaded zygote, real TCP on
127.0.0.1, one torch thread per peer), and reads its RUN_DIR/summary.json and
progress.jsonl. Time zero is the moment this script starts the launcher. The launcher's own
clock (the ``t`` of its events) starts when it creates the run dir, a few hundred ms
later; a watcher thread polls for that folder every 5 ms, so launch + offset + t is an
event's time since launch. The same thread samples every peer's CPU time and RSS from
/proc (pids from RUN_DIR/peers.json).

- ``tta``: the seed MLP on MNIST, batch 32, Adam 1e-3, every peer evaluating 4 times per
  local epoch; time from launch until every peer has reported >= 97.5% test accuracy.
  Interleaved, rep by rep, with one plain process and DDP (gloo) x2 and x4 from
  ``baselines.py``, so the ratios compare runs under the same load; with
  ``--hivemind-python`` (an interpreter that imports hivemind, kept out of the project's
  venv), also hivemind peers (``--hivemind-peer`` mode) with local updates;
- ``straggler``: 4 peers, with and without ``--fault 'at=0 kind=slow-peer peer=peer-3
  factor=4'`` (peer-3 sleeps 3x each step's time after the step); the other peers' steps/s
  while all four train. Interleaved with ``baselines.straggler`` (DDP x4, same slowdown);
- ``overhead``: 2 peers, ``--linger 0``, the default period (20 steps) against
  ``--period 1000000000`` (no exchange); a peer's wall time and CPU time per step while both
  train;
- ``startup``: 8 peers; launch to the first completed exchange (any peer's
  ``first_exchange``) and to every peer's first. Plus a probe (``--fork-probe`` mode): a
  parent pre-loaded like trainer/zygote.py forks one peer, with and without building an
  optimizer first (the first one imports torch._dynamo);
- ``memory``: RSS of a bare ``python -c "import torch"`` against peers run by this script's
  own ``--memory-peer`` mode, which is ``gossip-train peer`` (trainer.loop.Trainer,
  trainer.peer.Peer, TcpTransport) with the model optionally swapped before the peer starts,
  so a ~10M-parameter MLP can be measured without a new model in trainer/. Each peer
  reports its RSS at every stage (imports, data, model, each event).

    .venv/bin/python benchmarks/training.py                     # all, 3 reps: 15-30 min on 2 cores
    .venv/bin/python benchmarks/training.py --quick             # smoke run, bundled data set
    .venv/bin/python benchmarks/training.py --only tta,overhead --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import baselines
from common import (
    DEFAULT_MNIST,
    REPO,
    code_version,
    command_line,
    emit,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    python_cmd,
    read_result,
)

log = logging.getLogger(__name__)

MEASURES = ("tta", "straggler", "overhead", "startup", "memory")
# Training-set sizes, to turn --eval-every into "4 times per local epoch" without loading data.
TRAIN_SIZE = {"mnist": 60_000, "fashion-mnist": 60_000, "default": 12_000}
NO_GOSSIP = 1_000_000_000  # --period that never comes: gossip off
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class GossipBenchConfig:
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
    baseline: baselines.BaselineConfig = field(default_factory=baselines.BaselineConfig)


QUICK = GossipBenchConfig(
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
    baseline=baselines.QUICK,
)


# -- driving `gossip-train local` ---------------------------------------------------------------
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
    """Notes when the launcher creates its run dir, then samples its peers from /proc."""

    def __init__(self, run_dir: Path, launched: float, interval: float = 0.2) -> None:
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
        while not self.done.wait(self.interval):
            self._sample()

    def _pids(self) -> dict[str, int]:
        try:
            info = json.loads((self.run_dir / "peers.json").read_text())
        except (OSError, ValueError):
            return {}
        return {p["name"]: p["pid"] for p in info.get("peers", []) if p.get("pid")}

    def _sample(self) -> None:
        for name, pid in self._pids().items():
            got = read_proc(pid)
            if got is not None:
                self.samples.append(Sample(time.time(), name, pid, *got))


@dataclass
class Launch:
    """One finished `gossip-train local` run."""

    run_dir: Path
    launched: float  # time.time() just before the launcher process was started
    offset: float  # seconds from launch to the launcher's clock zero
    exit_s: float  # seconds from launch to the launcher's exit
    summary: dict[str, Any]
    samples: list[Sample]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.summary["events"] if e.get("kind") == kind]

    def since_launch(self, t: float) -> float:
        return self.offset + t

    def progress(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for line in (self.run_dir / "progress.jsonl").read_text().splitlines():
            ev = json.loads(line)
            out.setdefault(ev["peer"], []).append(ev)
        return out


def launch_local(run_dir: Path, args: Sequence[str], timeout: float) -> Launch:
    """Run ``gossip-train local`` to its end; its output goes to RUN_DIR.out."""
    argv = [*python_cmd(), "-m", "trainer.cli", "local", "--run-dir", str(run_dir)]
    argv += ["--no-progress", *args]
    log.info("run: %s", " ".join(argv[2:]))
    out_path = run_dir.with_suffix(".out")
    with open(out_path, "w") as out:
        launched = time.time()
        watcher = Watcher(run_dir, launched)
        watcher.start()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher stops its peers on SIGTERM
            proc.wait(timeout=30)
            raise RuntimeError(f"{run_dir.name}: no end within {timeout:.0f} s") from None
        finally:
            watcher.done.set()
            watcher.join(timeout=5)
    exit_s = time.time() - launched
    if rc != 0 or watcher.offset is None or not (run_dir / "summary.json").exists():
        tail = out_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{run_dir.name}: launcher exited with {rc}: {' | '.join(tail)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return Launch(run_dir, launched, watcher.offset, exit_s, summary, watcher.samples)


def common_args(cfg: GossipBenchConfig, peers: int, epochs: float) -> list[str]:
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


def load_now() -> float:
    return os.getloadavg()[0]


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


# -- (b) time to accuracy ---------------------------------------------------------------------
def reach_times(run: Launch, target: float) -> dict[str, Any]:
    """When every peer had reported >= target at least once, and when all at once."""
    evals = sorted(run.events("eval"), key=lambda e: e["t"])
    peers = [p["name"] for p in run.summary["peers"]]
    first: dict[str, dict[str, Any]] = {}
    latest: dict[str, float] = {}
    together = None
    for e in evals:
        if e["accuracy"] >= target and e["peer"] not in first:
            first[e["peer"]] = e
        latest[e["peer"]] = e["accuracy"]
        if together is None and len(latest) == len(peers) and min(latest.values()) >= target:
            together = e["t"]
    every = (
        max((e["t"] for e in first.values()), default=None) if len(first) == len(peers) else None
    )
    last_step = max((e["step"] for e in first.values()), default=0)
    return {
        "every_peer_t": every,
        "all_at_once_t": together,
        "step_of_last_peer": last_step if every is not None else None,
        "curves": {p: [[e["step"], e["t"], e["accuracy"]] for e in evals if e["peer"] == p]
                   for p in peers},
    }  # fmt: skip


def gossip_tta(cfg: GossipBenchConfig, runs: Runs, peers: int) -> dict[str, Any]:
    every = max(1, round(steps_per_epoch(cfg, peers) / cfg.evals_per_epoch))
    args = [*common_args(cfg, peers, cfg.tta_epochs), "--eval-every", str(every)]
    load = load_now()
    run = launch_local(runs.next(f"tta-x{peers}"), args, cfg.timeout)
    reach = reach_times(run, cfg.target)
    t = reach["every_peer_t"]
    events = {k: min((e["t"] for e in run.events(k)), default=None) for k in ("started",)}
    spe = steps_per_epoch(cfg, peers)
    return {
        "name": f"gossip-train x{peers}",
        "peers": peers,
        "eval_every_steps": every,
        "reached": t is not None,
        "time_to_target_s": run.since_launch(t) if t is not None else None,
        "all_at_once_s": run.since_launch(reach["all_at_once_t"])
        if reach["all_at_once_t"] is not None
        else None,
        "epochs_to_target": reach["step_of_last_peer"] / spe if t is not None else None,
        "startup_s": run.since_launch(events["started"]) if events["started"] else None,
        "launcher_offset_s": run.offset,
        "final_accuracies": [p["test_accuracy"] for p in run.summary["peers"]],
        "consensus_accuracy": run.summary.get("consensus_test_accuracy"),
        "exchanges": [p["exchanges"] for p in run.summary["peers"]],
        "wall_s": run.exit_s,
        "load_1m": [load, load_now()],
        "curves": reach["curves"],
        "run_dir": str(run.run_dir),
    }


def time_to_accuracy(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if cfg.with_baselines:
        jobs.append(("single process", partial(ddp_tta, 1, cfg)))
    jobs += [(f"gossip-train x{n}", partial(gossip_tta, cfg, runs, n)) for n in cfg.tta_peers]
    if cfg.with_baselines:
        jobs += [(f"DDP gloo x{w}", partial(ddp_tta, w, cfg)) for w in (2, 4)]
    hivemind = hivemind_interpreter(cfg)
    if hivemind:
        jobs += [(f"hivemind x{n}", partial(hivemind_tta, cfg, runs, n, hivemind))
                 for n in cfg.tta_peers]  # fmt: skip
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in jobs}
    for rep in range(cfg.reps):
        for name, job in jobs:
            log.info("tta rep %d/%d: %s (load %.1f)", rep + 1, cfg.reps, name, load_now())
            reps[name].append(job())
    rows = {name: tta_median(results) for name, results in reps.items()}
    note = None if hivemind else "hivemind is not installed; its rows were skipped"
    return {"rows": rows, "reps": reps, "ratios": tta_ratios(reps), "hivemind": note}


def ddp_tta(world: int, cfg: GossipBenchConfig) -> dict[str, Any]:
    load = load_now()
    r = baselines.time_to_accuracy(world, cfg.baseline)
    r["load_1m"] = [load, load_now()]
    r.pop("curve", None)
    return r


def tta_median(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": len(results),
        "reached": sum(1 for r in results if r["reached"]),
        "time_to_target_s": median([r["time_to_target_s"] for r in results]),
        "times_s": [r["time_to_target_s"] for r in results],
        "epochs_to_target": median([r["epochs_to_target"] for r in results]),
        "startup_s": median([r["startup_s"] for r in results]),
        "load_1m": [r["load_1m"][0] for r in results],
    }


def tta_ratios(reps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Time / reference time, paired within each rep, then the median of the pairs."""
    pairs = [("gossip-train x2", "single process"), ("gossip-train x2", "DDP gloo x2"),
             ("gossip-train x2", "DDP gloo x4"), ("gossip-train x4", "single process"),
             ("gossip-train x4", "DDP gloo x4")]  # fmt: skip
    return paired_ratios(reps, pairs)


# -- (b) hivemind ------------------------------------------------------------------------------
def hivemind_interpreter(cfg: GossipBenchConfig) -> str | None:
    """The interpreter to run hivemind peers with, or None when it cannot import hivemind."""
    python = cfg.hivemind_python or sys.executable
    try:
        subprocess.run([python, "-c", "import hivemind"], check=True, capture_output=True,
                       timeout=300)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        log.info("hivemind: not importable by %s; skipped", python)
        return None
    return python


def hivemind_tta(cfg: GossipBenchConfig, runs: Runs, peers: int, python: str) -> dict[str, Any]:
    """N hivemind peers on 127.0.0.1; stopped once every peer has reported the target."""
    run_dir = runs.next(f"hivemind-x{peers}")
    run_dir.mkdir(parents=True)
    every = max(1, round(steps_per_epoch(cfg, peers) / cfg.evals_per_epoch))
    load = load_now()
    launched = time.time()
    spec = {
        "peers": peers, "dataset": cfg.dataset, "data_dir": cfg.data, "launch": launched,
        "eval_every": every, "max_steps": round(cfg.tta_epochs * steps_per_epoch(cfg, peers)),
        "target_batch_size": 32 * peers * cfg.hivemind_steps_between_averages,
        "matchmaking_time": cfg.hivemind_matchmaking_time, "run_id": run_dir.name,
    }  # fmt: skip
    procs: list[subprocess.Popen[str]] = []
    try:
        for index in range(peers):
            argv = [
                python,
                str(Path(__file__)),
                "--hivemind-peer",
                json.dumps({**spec, "index": index}),
            ]
            log_file = open(run_dir / f"peer-{index}.log", "w")  # noqa: SIM115 - the child's
            # Its own session: a hivemind peer starts a DHT process, an averager process and
            # a p2pd daemon, which must all go when the peer is stopped.
            procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                                          text=True, start_new_session=True))  # fmt: skip
            log_file.close()
            if index == 0:
                spec["initial_peers"] = wait_line(procs[0], "MADDRS ", cfg.timeout)
        evals = hivemind_evals(procs, cfg.target, launched + cfg.hivemind_timeout)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return hivemind_result(peers, evals, cfg, launched, load, run_dir)


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


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> Any:
    return json.loads(read_until(proc, prefix, timeout, "hivemind peer"))


def hivemind_evals(procs: list[subprocess.Popen[str]], target: float, deadline: float) -> list:
    """Read every peer's EVAL lines until each has reported ``target`` (or all have ended)."""
    evals: list[dict[str, Any]] = []
    reached: set[int] = set()
    live = {p.stdout.fileno(): (i, p) for i, p in enumerate(procs) if p.stdout is not None}
    while live and len(reached) < len(procs) and time.time() < deadline:
        ready, _, _ = select.select(list(live), [], [], 1.0)
        for fd in ready:
            index, proc = live[fd]
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                del live[fd]
            elif line.startswith("EVAL "):
                ev = {**json.loads(line[5:]), "peer": index}
                evals.append(ev)
                if ev["accuracy"] >= target:
                    reached.add(index)
    return evals


def hivemind_result(peers: int, evals: list, cfg: GossipBenchConfig, launched: float,
                    load: float, run_dir: Path) -> dict[str, Any]:  # fmt: skip
    first: dict[int, dict[str, Any]] = {}
    for ev in evals:
        if ev["accuracy"] >= cfg.target:
            first.setdefault(ev["peer"], ev)
    done = len(first) == peers
    started = [e["started_s"] for e in evals if "started_s" in e]
    return {
        "name": f"hivemind x{peers}",
        "peers": peers,
        "reached": done,
        "time_to_target_s": max(e["t"] for e in first.values()) if done else None,
        "epochs_to_target": max(e["step"] for e in first.values()) / steps_per_epoch(cfg, peers)
        if done
        else None,
        "startup_s": max(started) if started else None,
        "averaging_epochs": max((e["hivemind_epoch"] for e in evals), default=0),
        "wall_s": time.time() - launched,
        "load_1m": [load, load_now()],
        "curves": evals,
        "run_dir": str(run_dir),
    }


def hivemind_peer_main(spec_json: str) -> None:
    """--hivemind-peer: the seed MLP on this peer's shard under hivemind.Optimizer."""
    spec = json.loads(spec_json)
    sys.path.insert(0, str(REPO))  # hivemind lives in another venv; the project is here
    import hivemind
    import torch

    from trainer.data import BatchIterator, load_dataset
    from trainer.models import build_model, evaluate
    from trainer.partition import partition

    torch.set_num_threads(1)
    n, index = spec["peers"], spec["index"]
    data = load_dataset(
        spec["dataset"], Path(spec["data_dir"]) if spec["dataset"] != "default" else None
    )
    shard = partition(data.y_train.numpy(), n, index, "iid", 0, min_samples=32)
    batches = BatchIterator(data.x_train, data.y_train, shard, 32, 0, index)
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    dht = hivemind.DHT(initial_peers=spec.get("initial_peers", []),
                       host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # fmt: skip
    if index == 0:
        print("MADDRS " + json.dumps([str(a) for a in dht.get_visible_maddrs()]), flush=True)
    opt = hivemind.Optimizer(
        dht=dht, run_id=spec["run_id"], batch_size_per_step=32,
        target_batch_size=spec["target_batch_size"], params=model.parameters(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), use_local_updates=True,
        matchmaking_time=spec["matchmaking_time"], averaging_timeout=10.0, verbose=False,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.time() - spec["launch"]
    for step in range(1, spec["max_steps"] + 1):
        x, y = next(batches)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if step % spec["eval_every"] == 0:
            acc = evaluate(model, data.x_test, data.y_test)
            ev = {"step": step, "t": time.time() - spec["launch"], "accuracy": acc,
                  "hivemind_epoch": opt.local_epoch, "started_s": started}  # fmt: skip
            print("EVAL " + json.dumps(ev), flush=True)
    opt.shutdown()
    dht.shutdown()


# -- (c) straggler --------------------------------------------------------------------------------
def gossip_straggler_run(cfg: GossipBenchConfig, runs: Runs, slow: bool) -> dict[str, Any]:
    n = cfg.straggler_peers
    victim = f"peer-{n - 1}"
    args = [*common_args(cfg, n, cfg.straggler_epochs), "--linger", "0"]
    if slow:
        args += ["--fault", f"at=0 kind=slow-peer peer={victim} factor={cfg.slowdown:g}"]
    load = load_now()
    run = launch_local(runs.next("straggler" if slow else "no-straggler"), args, cfg.timeout)
    # With the fault, the window opens when the straggler says it has slowed down.
    slowed = [e["t"] for e in run.events("slowdown")]
    if slow and not slowed:
        raise RuntimeError(f"{run.run_dir.name}: the slow-peer fault was never applied")
    window = training_window(run, start_after=max(slowed, default=0.0))
    rates = peer_rates(run, window)
    others = [r["steps_per_s"] for p, r in rates.items() if p != victim and r["steps_per_s"]]
    if not others:
        raise RuntimeError(f"{run.run_dir.name}: all peers never trained together; more epochs")
    return {
        "straggler": slow,
        "window_s": list(window),
        "per_peer": rates,
        "others_steps_per_s": statistics.mean(others),
        "victim_steps_per_s": rates[victim]["steps_per_s"],
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def straggler(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    gossip: dict[str, list[dict[str, Any]]] = {"no": [], "slow": []}
    ddp: list[dict[str, Any]] = []
    bcfg = replace(cfg.baseline, slowdown=cfg.slowdown - 1.0)
    for rep in range(cfg.reps):
        log.info("straggler rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        gossip["no"].append(gossip_straggler_run(cfg, runs, slow=False))
        gossip["slow"].append(gossip_straggler_run(cfg, runs, slow=True))
        if cfg.with_baselines:
            load = load_now()
            d = baselines.straggler(bcfg, world=cfg.straggler_peers)
            d["load_1m"] = [load, load_now()]
            ddp.append(d)
    ratios = [
        s["others_steps_per_s"] / b["others_steps_per_s"]
        for b, s in zip(gossip["no"], gossip["slow"], strict=True)
    ]
    victim = [
        s["victim_steps_per_s"] / b["victim_steps_per_s"]
        for b, s in zip(gossip["no"], gossip["slow"], strict=True)
        if s["victim_steps_per_s"] and b["victim_steps_per_s"]
    ]
    return {
        "gossip": {
            "others_no_straggler": median([r["others_steps_per_s"] for r in gossip["no"]]),
            "others_with_straggler": median([r["others_steps_per_s"] for r in gossip["slow"]]),
            "others_ratio": median(ratios),
            "others_ratio_each": ratios,
            "straggler_speed_ratio": median(victim),
            "runs": gossip,
        },
        "ddp": {
            "others_no_straggler": median([d["no_straggler"]["others_steps_per_s"] for d in ddp]),
            "others_with_straggler": median(
                [d["with_straggler"]["others_steps_per_s"] for d in ddp]
            ),
            "others_ratio": median([d["others_ratio"] for d in ddp]),
            "others_ratio_each": [d["others_ratio"] for d in ddp],
            "runs": ddp,
        }
        if ddp
        else None,
    }


# -- (d) overhead ---------------------------------------------------------------------------------
def overhead_run(cfg: GossipBenchConfig, runs: Runs, gossip_on: bool) -> dict[str, Any]:
    args = [*common_args(cfg, 2, cfg.overhead_epochs), "--linger", "0"]
    if not gossip_on:
        args += ["--period", str(NO_GOSSIP)]
    load = load_now()
    run = launch_local(runs.next("gossip-on" if gossip_on else "gossip-off"), args, cfg.timeout)
    rates = peer_rates(run, training_window(run))
    peers = run.summary["peers"]
    finished = {e["peer"]: e for e in run.events("finished")}
    exch = sum(p["exchanges"] or 0 for p in peers)
    exch_s = sum(finished[p["name"]].get("exchange_seconds", 0.0) for p in peers)
    return {
        "gossip": gossip_on,
        "ms_per_step": median([1e3 / r["steps_per_s"] for r in rates.values() if r["steps_per_s"]]),
        "cpu_ms_per_step": median([r["cpu_per_step_ms"] for r in rates.values()]),
        "loop_cpu_ms_per_step": median([r.get("loop_cpu_per_step_ms") for r in rates.values()]),
        "locked_step_ms": median([1e3 * f.get("step_seconds", 0.0) for f in finished.values()]),
        "exchanges": exch,
        "exchange_ms_mean": 1e3 * exch_s / exch if exch else None,
        "per_peer": rates,
        "peak_rss_mb": max((s.hwm for s in run.samples), default=0) / 1e6,
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def overhead(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for rep in range(cfg.reps):
        log.info("overhead rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        # Alternate which goes first, so a load change mid-rep does not favour one side.
        order = (True, False) if rep % 2 == 0 else (False, True)
        for gossip_on in order:
            (on if gossip_on else off).append(overhead_run(cfg, runs, gossip_on))
    wall = [a["ms_per_step"] / b["ms_per_step"] - 1 for a, b in zip(on, off, strict=True)]
    cpu = [
        a["cpu_ms_per_step"] / b["cpu_ms_per_step"] - 1
        for a, b in zip(on, off, strict=True)
        if a["cpu_ms_per_step"] and b["cpu_ms_per_step"]
    ]
    return {
        "ms_per_step_on": median([r["ms_per_step"] for r in on]),
        "ms_per_step_off": median([r["ms_per_step"] for r in off]),
        "cpu_ms_per_step_on": median([r["cpu_ms_per_step"] for r in on]),
        "cpu_ms_per_step_off": median([r["cpu_ms_per_step"] for r in off]),
        "loop_cpu_ms_per_step_on": median([r["loop_cpu_ms_per_step"] for r in on]),
        "loop_cpu_ms_per_step_off": median([r["loop_cpu_ms_per_step"] for r in off]),
        "wall_overhead": median(wall),
        "wall_overhead_each": wall,
        "cpu_overhead": median(cpu),
        "cpu_overhead_each": cpu,
        "exchange_ms_mean": median([r["exchange_ms_mean"] for r in on]),
        "runs": {"on": on, "off": off},
    }


# -- (e) start-up -------------------------------------------------------------------------------
def startup_run(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    n = cfg.startup_peers
    args = [*common_args(cfg, n, cfg.startup_epochs), "--linger", str(cfg.startup_linger)]
    load = load_now()
    run = launch_local(runs.next(f"startup-x{n}"), args, cfg.timeout)

    def first(kind: str) -> float | None:
        ts = [e["t"] for e in run.events(kind)]
        return run.since_launch(min(ts)) if ts else None

    def last(kind: str) -> float | None:
        ts = [e["t"] for e in run.events(kind)]
        return run.since_launch(max(ts)) if len(ts) >= n else None

    return {
        "launcher_ready_s": run.offset,  # the launcher's imports, up to its clock zero
        "zygote_ready_s": first("network"),  # data set loaded in the zygote
        "first_spawned_s": first("spawned"),
        "all_spawned_s": last("spawned"),
        "all_listening_s": last("listening"),
        "all_started_s": last("started"),
        "first_exchange_s": first("first_exchange"),
        "every_peer_exchanged_s": last("first_exchange"),
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def startup(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    results = []
    probes: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    for rep in range(cfg.reps):
        log.info("start-up rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        results.append(startup_run(cfg, runs))
        for kind in probes:
            probes[kind].append(fork_probe(cfg, runs, warm=kind == "warm"))
    keys = [k for k in results[0] if k.endswith("_s")]
    return {
        "peers": cfg.startup_peers,
        "median": {k: median([r[k] for r in results]) for k in keys},
        "runs": results,
        "fork_probe": {
            kind: {k: median([r[k] for r in rs]) for k in rs[0] if k.endswith("_s")}
            for kind, rs in probes.items()
        },
        "fork_probe_runs": probes,
    }


def fork_probe(cfg: GossipBenchConfig, runs: Runs, warm: bool) -> dict[str, Any]:
    """A parent pre-loaded as trainer/zygote.py does forks one peer: seconds to its events.

    ``warm`` also builds one throwaway Adam optimizer in the parent before forking. The
    first optimizer a process builds imports torch._dynamo (torch.optim wraps its methods
    with torch._compile's disable decorator); the zygote does not, so each peer does.
    """
    spec = {"dataset": cfg.dataset, "data_dir": cfg.data if cfg.dataset != "default" else None,
            "warm": warm, "run_dir": str(runs.next("fork-probe"))}  # fmt: skip
    argv = [*python_cmd(), str(Path(__file__)), "--fork-probe", json.dumps(spec)]
    load = load_now()
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=cfg.timeout)
    result = read_result(out.stdout)
    if result is not None:
        return {**result, "load_1m": load}
    raise RuntimeError(f"fork probe exited with {out.returncode}: {out.stderr[-300:]}")


def fork_probe_main(spec_json: str) -> None:
    """--fork-probe: pre-load like the zygote, fork one `gossip-train peer`, time it."""
    spec = json.loads(spec_json)
    import torch

    torch.set_num_threads(1)
    import trainer.cli
    import trainer.peer  # noqa: F401 - what the zygote imports
    from trainer.data import dataset_for

    dataset_for(spec["dataset"], spec["data_dir"])
    if spec["warm"]:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    argv = ["peer", "--events", "jsonl", "--run-dir", spec["run_dir"], "--threads", "1",
            "--epochs", "0.01", "--dataset", spec["dataset"]]  # fmt: skip
    if spec["data_dir"]:
        argv += ["--data-dir", spec["data_dir"]]
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    forked = time.time()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.dup2(write_fd, 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os._exit(trainer.cli.main(argv))
    os.close(write_fd)
    seen: dict[str, float] = {}
    with os.fdopen(read_fd) as events:
        for line in events:
            ev = json.loads(line)
            seen.setdefault(ev["kind"], ev["ts"] - forked)
    _, status, usage = os.wait4(pid, 0)
    result = {
        "listening_s": seen.get("listening"),
        "started_s": seen.get("started"),
        "child_cpu_s": usage.ru_utime + usage.ru_stime,
        "exit": os.waitstatus_to_exitcode(status),
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- (f) memory ---------------------------------------------------------------------------------
def bare_torch_rss(reps: int = 3) -> dict[str, Any]:
    """RSS of a fresh ``python -c "import torch"``, measured inside it after the import."""
    code = (
        "import torch, pathlib; s = pathlib.Path('/proc/self/status').read_text();"
        "print([int(l.split()[1]) * 1024 for l in s.splitlines() if l.startswith('VmRSS:')][0])"
    )
    got = [
        int(subprocess.check_output([*python_cmd(), "-c", code], text=True)) for _ in range(reps)
    ]
    return {"rss_mb": statistics.median(got) / 1e6, "each_mb": [g / 1e6 for g in got]}


def memory_pair(cfg: GossipBenchConfig, hidden: int, work: Path) -> list[dict[str, Any]]:
    """Two --memory-peer processes; each one's stage report.

    The first trains until it is told to stop (SIGTERM, which a peer handles by finishing
    cleanly), so it is still there, training and exchanging, however long the second takes
    to start; the second joins it and trains ``memory_epochs``.
    """
    spec = {"hidden": hidden, "period": cfg.memory_period, "run_dir": str(work)}
    procs: list[subprocess.Popen[str]] = []

    def start(index: int, epochs: float, join: str | None) -> subprocess.Popen[str]:
        s = {**spec, "index": index, "epochs": epochs, "join": join}
        argv = [*python_cmd(), str(Path(__file__)), "--memory-peer", json.dumps(s)]
        procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True))
        return procs[-1]

    try:
        first = start(0, 1000.0, None)
        second = start(1, cfg.memory_epochs, wait_listening(first, cfg.timeout))
        joined = peer_result(second, cfg.timeout)
        first.terminate()
        return [peer_result(first, cfg.timeout), joined]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_listening(proc: subprocess.Popen[str], timeout: float) -> str:
    return read_until(proc, "LISTENING ", timeout, "memory peer").split()[0]


def peer_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"memory peer exited with {proc.returncode} and no result")


def memory(cfg: GossipBenchConfig, work: Path) -> dict[str, Any]:
    bare = bare_torch_rss()
    models = {"mlp (seed, 0.10M)": 0, f"mlp 784-{cfg.big_hidden}-10": cfg.big_hidden}
    out: dict[str, Any] = {"bare_torch": bare, "models": {}}
    for name, hidden in models.items():
        log.info("memory: %s (load %.1f)", name, load_now())
        peers = memory_pair(cfg, hidden, work / f"memory-{hidden or 'seed'}")
        out["models"][name] = memory_breakdown(peers, bare["rss_mb"])
    return out


def memory_breakdown(peers: list[dict[str, Any]], bare_mb: float) -> dict[str, Any]:
    """RSS of the pair against bare torch, and the first peer's growth stage by stage.

    The first peer (it never pulls a catch-up copy) gives the breakdown, in anonymous memory
    (RssAnon: heap and tensors; code pages of libraries show up in RssFile instead).
    """
    p = peers[0]
    mb = {k: {f: v / 1e6 for f, v in m.items()} for k, m in p["stages"].items()}
    anon = {k: m["anon"] for k, m in mb.items()}
    model_mb = p["model_bytes"] / 1e6
    training = max(max(q["training_rss"]) for q in peers) / 1e6
    started = anon["started"]
    stepped = anon.get("progress", started)
    exchanged = anon.get("first_exchange", stepped)
    steps = {
        "data set load": anon["data_and_seed_model"] - anon["imports"],
        "model built": anon["model"] - anon["data_and_seed_model"],
        "start (node, membership, exchanger)": started - anon["model"],
        "first step (grads, Adam state, temporaries)": stepped - started,
        "first exchange (snapshot, delta, receive buffer)": exchanged - stepped,
        "rest of training": max(p["training_anon"]) / 1e6 - exchanged,
    }
    model_part = sum(v for k, v in steps.items() if not k.startswith("data"))
    return {
        "params": p["params"],
        "model_mb": model_mb,
        "data_mb": p["data_bytes"] / 1e6,
        "stages_mb": mb,
        "anon_growth_mb": steps,
        "training_rss_mb": training,
        "peak_rss_mb": max(q["hwm"] for q in peers) / 1e6,
        "over_bare_mb": training - bare_mb,
        "over_bare_x_model": (training - bare_mb) / model_mb,
        "model_part_mb": model_part,
        "model_part_x_model": model_part / model_mb,
        "gossip_part_x_model": steps["first exchange (snapshot, delta, receive buffer)"] / model_mb,
        "steps": [q["steps"] for q in peers],
        "exchanges": [q["exchanges"] for q in peers],
        "training_rss_mb_each": [max(q["training_rss"]) / 1e6 for q in peers],
    }


def memory_peer_main(spec_json: str) -> None:
    """--memory-peer: run one peer as `gossip-train peer` does, reporting RSS at each stage."""
    spec = json.loads(spec_json)
    stages = {"python": mem()}
    import torch

    stages["torch"] = mem()
    import uvloop
    from torch import nn

    from gossip.exchange import GossipConfig
    from p2p.framing import Limits
    from p2p.transport import TcpTransport
    from trainer.config import PeerConfig, TrainConfig
    from trainer.data import dataset_for
    from trainer.loop import Trainer
    from trainer.optim import FlatAdam
    from trainer.peer import Peer
    from trainer.weights import FlatWeights

    stages["imports"] = mem()
    torch.set_num_threads(1)
    cfg = PeerConfig(
        name=f"mem-{spec['index']}",
        index=spec["index"],
        num_peers=2,
        join=(spec["join"],) if spec["join"] else (),
        run_dir=f"{spec['run_dir']}/peer-{spec['index']}",
        train=TrainConfig(epochs=spec["epochs"], threads=1),
        gossip=GossipConfig(period_steps=spec["period"]),
    )
    trainer = Trainer(cfg.train, cfg.index, cfg.num_peers)
    stages["data_and_seed_model"] = mem()
    if spec["hidden"]:
        h = spec["hidden"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, h), nn.ReLU(), nn.Linear(h, 10))
        trainer.model = model
        trainer.weights = FlatWeights(model)
        trainer.optimizer = FlatAdam(trainer.weights, lr=cfg.train.lr or 1e-3)
    stages["model"] = mem()
    training: list[dict[str, int]] = []

    def report(event: dict[str, Any]) -> None:
        now = mem()
        if event["kind"] == "listening":
            print(f"LISTENING {event['addr']}", flush=True)
        if event["kind"] in ("first_exchange", "progress"):
            training.append(now)
        stages.setdefault(event["kind"], now)

    limits = Limits(max_payload=max(64 << 20, 2 * trainer.weights.nbytes))
    result = uvloop.run(Peer(cfg, trainer, TcpTransport(limits), report).run())
    data = dataset_for(cfg.train.dataset, cfg.train.data_dir)  # the task's, loaded once
    out = {
        "stages": stages,
        "training_rss": [m["rss"] for m in training],
        "training_anon": [m["anon"] for m in training],
        "hwm": mem()["hwm"],
        "params": int(trainer.weights.array.size),
        "model_bytes": int(trainer.weights.nbytes),
        "data_bytes": int(sum(t.nbytes for t in (data.x_train, data.x_test))),
        "steps": result["steps"],
        "exchanges": result["exchanges"],
    }
    print("RESULT " + json.dumps(out), flush=True)


def mem() -> dict[str, int]:
    """This process's RSS, its anonymous and file-backed parts, and its peak, in bytes."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "hwm"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in keys:
            out[keys[key]] = int(line.split()[1]) * 1024
    return out


# -- output ---------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def tta_table(r: dict[str, Any], target: float) -> str:
    rows = []
    for name, m in r["rows"].items():
        times = ", ".join(fmt(t, ".1f", "n/r") for t in m["times_s"])
        rows.append(
            [name, fmt(m["time_to_target_s"], ".1f", "not reached"), times,
             f"{m['reached']}/{m['n']}", fmt(m["epochs_to_target"]), fmt(m["startup_s"], ".1f"),
             ", ".join(f"{x:.1f}" for x in m["load_1m"])]
        )  # fmt: skip
    table = markdown_table(
        ["run", f"time to {target:.1%}, median (s)", "each rep (s)", "reached", "epochs",
         "start-up (s)", "load at start"],
        rows,
    )  # fmt: skip
    ratios = markdown_table(
        ["ratio (paired by rep)", "median", "each"],
        [[k, fmt(v["median"]), ", ".join(f"{x:.2f}" for x in v["each"])]
         for k, v in r["ratios"].items()],
    )  # fmt: skip
    return table + "\n\n" + ratios


def straggler_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    g, d = r["gossip"], r["ddp"]
    rows = [
        [f"gossip-train x{cfg.straggler_peers}", fmt(g["others_no_straggler"], ".0f"),
         fmt(g["others_with_straggler"], ".0f"), fmt(g["others_ratio"], ".0%"),
         ", ".join(f"{x:.0%}" for x in g["others_ratio_each"])],
    ]  # fmt: skip
    if d:
        rows.append(
            [f"DDP gloo x{cfg.straggler_peers}", fmt(d["others_no_straggler"], ".0f"),
             fmt(d["others_with_straggler"], ".0f"), fmt(d["others_ratio"], ".0%"),
             ", ".join(f"{x:.0%}" for x in d["others_ratio_each"])]
        )  # fmt: skip
    return markdown_table(
        ["run", "others' steps/s, no straggler", "with straggler", "ratio (median)", "each rep"],
        rows,
    )


def overhead_table(r: dict[str, Any]) -> str:
    return markdown_table(
        ["gossip", "wall ms/step (median)", "CPU ms/step (median)",
         "event-loop thread CPU ms/step", "mean exchange ms"],
        [
            ["on (period 20)", fmt(r["ms_per_step_on"]), fmt(r["cpu_ms_per_step_on"]),
             fmt(r.get("loop_cpu_ms_per_step_on"), ".3f"), fmt(r["exchange_ms_mean"])],
            ["off", fmt(r["ms_per_step_off"]), fmt(r["cpu_ms_per_step_off"]),
             fmt(r.get("loop_cpu_ms_per_step_off"), ".3f"), "-"],
            ["overhead", fmt(r["wall_overhead"], "+.0%"), fmt(r["cpu_overhead"], "+.0%"), "-",
             "wall each rep: " + ", ".join(f"{x:+.0%}" for x in r["wall_overhead_each"])],
        ],
    )  # fmt: skip


def startup_table(r: dict[str, Any]) -> str:
    rows = [[k.removesuffix("_s").replace("_", " "), fmt(v)] for k, v in r["median"].items()]
    probe = [
        [kind, fmt(m["listening_s"]), fmt(m["started_s"]), fmt(m["child_cpu_s"])]
        for kind, m in r["fork_probe"].items()
    ]
    return (
        markdown_table([f"{r['peers']} peers: seconds since launch", "median"], rows)
        + "\n\n"
        + markdown_table(
            [
                "one forked peer, parent torch._dynamo",
                "fork to listening (s)",
                "to started (s)",
                "child CPU (s)",
            ],
            probe,
        )  # fmt: skip
    )


def memory_table(r: dict[str, Any]) -> str:
    rows = []
    for name, m in r["models"].items():
        rows.append(
            [name, f"{m['params']:,}", fmt(m["model_mb"]), fmt(m["data_mb"], ".1f"),
             fmt(m["training_rss_mb"], ".0f"), fmt(m["over_bare_mb"], ".0f"),
             fmt(m["over_bare_x_model"], ".1f"), fmt(m["model_part_x_model"], ".1f"),
             fmt(m["gossip_part_x_model"], ".1f")]
        )  # fmt: skip
    head = f"bare `python -c 'import torch'`: {r['bare_torch']['rss_mb']:.0f} MB RSS\n\n"
    growth = []
    for name, m in r["models"].items():
        growth += [[name, k, fmt(v, ".1f"), fmt(v / m["model_mb"], ".1f")]
                   for k, v in m["anon_growth_mb"].items()]  # fmt: skip
    return (
        head
        + markdown_table(
            [
                "model",
                "params",
                "model MB",
                "data MB",
                "peer RSS, training (MB)",
                "over bare (MB)",
                "over bare / model",
                "model-driven growth / model",
                "gossip buffers / model",
            ],
            rows,
        )  # fmt: skip
        + "\n\n"
        + markdown_table(["model", "anonymous memory added by", "MB", "/ model"], growth)
    )


# -- main -----------------------------------------------------------------------------------------
def run_measures(cfg: GossipBenchConfig, only: Sequence[str], work: Path) -> tuple[dict, list]:
    runs = Runs(work)
    out: dict[str, Any] = {}
    tables: list[str] = []
    steps: dict[str, Callable[[], None]] = {}

    def add(name: str, result: dict[str, Any], table: str) -> None:
        out[name] = result
        tables.append(f"### {name}\n\n{table}")

    steps["tta"] = lambda: add("tta", r := time_to_accuracy(cfg, runs), tta_table(r, cfg.target))
    steps["straggler"] = lambda: add(
        "straggler", r := straggler(cfg, runs), straggler_table(r, cfg)
    )
    steps["overhead"] = lambda: add("overhead", r := overhead(cfg, runs), overhead_table(r))
    steps["startup"] = lambda: add("startup", r := startup(cfg, runs), startup_table(r))
    steps["memory"] = lambda: add("memory", r := memory(cfg, work), memory_table(r))
    for name in only:
        steps[name]()
    return out, tables


def main() -> None:
    workers = {
        "--memory-peer": memory_peer_main,
        "--fork-probe": fork_probe_main,
        "--hivemind-peer": hivemind_peer_main,
    }
    if len(sys.argv) == 3 and sys.argv[1] in workers:
        workers[sys.argv[1]](sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run, bundled data")
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated measures")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3)")
    parser.add_argument("--data", default="", help=f"MNIST folder (default {DEFAULT_MNIST})")
    parser.add_argument("--no-baselines", action="store_true", help="gossip runs only")
    parser.add_argument(
        "--hivemind-python", default="", help="interpreter with hivemind (default: this one)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs here (else temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MEASURES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(MEASURES)}")
    cfg = QUICK if args.quick else GossipBenchConfig()
    if args.reps:
        cfg = replace(cfg, reps=args.reps)
    if args.no_baselines:
        cfg = replace(cfg, with_baselines=False)
    if args.hivemind_python:
        cfg = replace(cfg, hivemind_python=args.hivemind_python)
    if args.data:
        cfg = replace(cfg, data=args.data, baseline=replace(cfg.baseline, data=args.data))
    check_data(cfg)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gossip-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "training",
        "command": command_line(),
        "machine": machine_info(),
        "config": asdict(cfg),
    }
    try:
        measured, tables = run_measures(cfg, only, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result.update(measured)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["machine"]["commit_at_end"] = code_version()  # others may change the tree meanwhile
    emit(result, tables, args.json)


def check_data(cfg: GossipBenchConfig) -> None:
    """MNIST must be there for a full run (and for the baselines, even in a quick one)."""
    needs = cfg.dataset != "default" or cfg.with_baselines
    if needs and not Path(cfg.data).is_dir():
        sys.exit(f"training.py: MNIST folder {cfg.data} not found (see --data)")


if __name__ == "__main__":
    main()
