"""Slow links: time to target and traffic of gossip configurations over capped links, and DDP.

Four peers, each a host of its own (``gossip-train local --netns``: a network namespace with
its own IP, one veth pair to a bridge), every peer's link capped with ``--netns-rate``
(``tc tbf`` on the egress of both ends of its veth pair, so the cap holds in each direction;
bucket 20 ms of the rate, at least 16 KiB; at most 200 ms of queue: ``trainer.chaos.netns``),
at each rate of ``--links`` ("unlimited": no qdisc at all). For each task, configuration and
link it measures:

- time to target: from just before the launcher is started (and from the moment every peer
  trains: the last peer's ``started`` event) until every peer has had an evaluation at the
  target (``eval`` events in RUN_DIR/peer-i/events.jsonl, read while the run goes); the run is
  stopped there (SIGTERM to the launcher; ``--run-to-end`` lets it run its whole budget);
- bytes per peer, sent + received: the peers' own counts (``bytes_sent``/``bytes_received``
  of their progress events) at the target and in all, with the per-kind split ``bytes``
  ({weights, membership, control}) where the peers report it; and, as a cross-check, the
  kernel's counters of each peer's veth (``/sys/class/net/<host end>/statistics``, sampled
  every 0.25 s from the root namespace, interpolated at the target), which also count the
  IP and TCP headers;
- the final metric of every peer (at the stop), and steps per peer at the target and in all.

Tasks: ``mnist`` (the seed MLP on MNIST, batch 32, Adam 1e-3, to 97.5% test accuracy on every
peer, evaluating 4 times per local epoch) and ``shakespeare`` (the built-in transformer task,
batch 12, AdamW 1e-3, clip 1.0, to validation loss 1.90, evaluating every 100 steps). Every
peer and DDP rank runs one torch thread.

Configurations (``CONFIGS``: a name and the extra ``gossip-train local`` flags) are checked
against ``gossip-train local --help`` once; one whose flags this checkout lacks is skipped
with a note, so the script runs with whatever flags exist.

Baseline: torch DDP over gloo, 4 ranks, each rank in a namespace of its own on capped links
as above (``GLOO_SOCKET_IFNAME=eth0``, ``MASTER_ADDR`` rank 0's address), the same model,
data, batch, lr and evaluation schedule (``_ddp_worker.py`` for mnist, ``_lm_worker.py``
for shakespeare; rank 0 evaluates and every rank stops at the target). Its bytes are the
veth counters after the ranks exit.

Runs are interleaved rep by rep (task, link, DDP, then the configurations); medians over reps
are reported, and time ratios are paired within a rep. Needs root.

    .venv/bin/python benchmarks/slowlink.py --json slowlink.json           # the whole matrix
    .venv/bin/python benchmarks/slowlink.py --tasks mnist --configs fp32,int8 \\
        --links unlimited,10mbit --reps 3 --json mnist.json
    .venv/bin/python benchmarks/slowlink.py --quick     # smoke: mnist to 90% at unlimited
                                                        # and 10mbit, DDP at 10mbit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import transformer
import tta
from common import (
    BENCH_DIR,
    DEFAULT_MNIST,
    REPO,
    Launch,
    Runs,
    code_version,
    command_line,
    emit,
    fmt,
    interp,
    load_now,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    python_cmd,
    read_json,
    read_peers,
    read_summary,
    require_result,
    run_ranks,
    start_local,
)

from trainer.chaos.netns import (
    BURST_SECONDS,
    MIN_BURST,
    NamespaceNet,
    NetnsConfig,
    netns_available,
    parse_rate,
)
from trainer.launch import summary as run_summary

log = logging.getLogger(__name__)

PEERS = 4
POLL_S = 0.25  # how often events and veth counters are read while a gossip run goes
DDP_PORT = 29500
DDP_GRACE = 120.0  # seconds past --max-seconds for the last evaluation and the teardown
DDP = "DDP gloo x4"
UNLIMITED = "unlimited"

# name -> extra `gossip-train local` flags. fp32 is today's default exchange.
OUTER = ("--outer-steps", "500", "--outer-lr", "0.7", "--outer-momentum", "0.9")
CONFIGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("--compress", "fp16"),
    "bf16": ("--compress", "bf16"),
    "int8": ("--compress", "int8"),
    "outer": OUTER,
    "outer+int8": (*OUTER, "--compress", "int8"),
    # Variants of the outer optimizer (one outer step per H inner steps).
    "outer250": ("--outer-steps", "250", "--outer-lr", "0.7", "--outer-momentum", "0.9"),
    "outer250+int8": (
        "--outer-steps", "250", "--outer-lr", "0.7", "--outer-momentum", "0.9",
        "--compress", "int8",
    ),
    "avg500+int8": (
        "--outer-steps", "500", "--outer-lr", "1.0", "--outer-momentum", "0",
        "--compress", "int8",
    ),
    "avg250+int8": (
        "--outer-steps", "250", "--outer-lr", "1.0", "--outer-momentum", "0",
        "--compress", "int8",
    ),
}  # fmt: skip
LINKS = (UNLIMITED, "100mbit", "10mbit")
QUICK_LINKS, QUICK_DDP_LINKS = (UNLIMITED, "10mbit"), ("10mbit",)


# -- what is measured -------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the key of the eval events' metrics
    target: float
    higher_is_better: bool
    # `gossip-train local` flags of the task (without --peers, --netns, the data folder).
    gossip: tuple[str, ...]
    # The DDP worker script and its flags (without rank, world, init, launch, target).
    worker: str
    ddp: tuple[str, ...]
    timeout: float  # one run, all its processes

    def hit(self, value: float | None) -> bool:
        if value is None:
            return False
        return value >= self.target if self.higher_is_better else value <= self.target

    def best(self, values: Sequence[float | None]) -> float | None:
        got = [v for v in values if v is not None]
        if not got:
            return None
        return max(got) if self.higher_is_better else min(got)

    def worst(self, values: Sequence[float | None]) -> float | None:
        got = [v for v in values if v is not None]
        if not got:
            return None
        return min(got) if self.higher_is_better else max(got)

    def label(self) -> str:
        if self.metric == "accuracy":
            return f"{self.target:.1%} test accuracy"
        return f"{self.metric} {self.target:g}"


# 60,000 MNIST samples over 4 peers in batches of 32: 469 steps per local epoch.
MNIST_STEPS_PER_EPOCH = -(-60_000 // PEERS // 32)


def mnist_task(data: str, target: float, epochs: float, evals_per_epoch: int) -> Task:
    every = max(1, round(MNIST_STEPS_PER_EPOCH / evals_per_epoch))
    gossip = (
        "--dataset",
        "mnist",
        "--data-dir",
        data,
        "--epochs",
        f"{epochs:g}",
        "--eval-every",
        str(every),
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
    )
    ddp = (
        "--data",
        data,
        "--max-epochs",
        f"{epochs:g}",
        "--eval-every",
        f"{1 / evals_per_epoch:g}",
        "--batch",
        "32",
        "--lr",
        "1e-3",
    )
    return Task(
        "mnist",
        "accuracy",
        target,
        True,
        gossip,
        "_ddp_worker.py",
        ("--job", "tta", *ddp),
        timeout=1800.0,
    )


def shakespeare_task(target: float, steps: int, eval_every: int) -> Task:
    gossip = (
        "--task",
        "shakespeare",
        "--steps",
        str(steps),
        "--eval-every",
        str(eval_every),
        "--clip-grad",
        "1.0",
    )
    ddp = (
        "--job",
        "tta",
        "--threads",
        "1",
        "--max-steps",
        str(steps),
        "--eval-every",
        str(eval_every),
        "--clip-grad",
        "1.0",
        "--batch",
        "12",
        "--lr",
        "1e-3",
    )
    return Task(
        "shakespeare", "val_loss", target, False, gossip, "_lm_worker.py", ddp, timeout=3600.0
    )


def make_tasks(quick: bool, data: str) -> dict[str, Task]:
    """The full targets (97.5%, 1.90), or --quick's low ones that take a minute or two."""
    if quick:
        return {
            "mnist": replace(mnist_task(data, 0.90, 1.0, 8), timeout=600.0),
            "shakespeare": replace(shakespeare_task(3.0, 150, 50), timeout=900.0),
        }
    return {
        "mnist": mnist_task(data, 0.975, 12.0, 4),
        "shakespeare": shakespeare_task(1.90, 3000, 100),
    }


@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    configs: tuple[str, ...]
    links: tuple[str, ...]
    ddp_links: tuple[str, ...]
    reps: int = 1
    stop_at_target: bool = True
    skipped: dict[str, list[str]] = field(default_factory=dict)  # config -> missing flags
    ddp_timeout: float | None = None  # seconds a DDP run may take (None: the task's)


# -- which configurations this checkout can run --------------------------------------------------
FLAG_RE = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def help_flags(text: str) -> set[str]:
    """Every ``--flag`` a ``--help`` text names."""
    return set(FLAG_RE.findall(text))


def missing_flags(flags: Sequence[str], known: set[str]) -> list[str]:
    """The ``--flags`` among ``flags`` (flag values are skipped) that ``known`` lacks."""
    return [f for f in flags if f.startswith("--") and f.split("=", 1)[0] not in known]


def local_flags() -> set[str]:
    """The flags of this checkout's ``gossip-train local`` (its --help, read once)."""
    out = subprocess.run(
        [*python_cmd(), "-m", "trainer.cli", "local", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return help_flags(out.stdout)


def runnable(configs: Sequence[str], known: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The configurations whose flags exist, and the missing flags of the others."""
    ok, skipped = [], {}
    for name in configs:
        missing = missing_flags(CONFIGS[name], known)
        if missing:
            skipped[name] = missing
        else:
            ok.append(name)
    return ok, skipped


def link_rate(link: str) -> str | None:
    """None for "unlimited", else the tc rate itself (ValueError when tc would not take it)."""
    if link == UNLIMITED:
        return None
    parse_rate(link)
    return link


# -- one gossip run -------------------------------------------------------------------------------
class Tail:
    """New whole lines of a peer's events.jsonl since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def metric_of(event: dict[str, Any], metric: str) -> float | None:
    value = (event.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


class Counters:
    """Samples of every peer's veth counters: (time.time(), [(sent, received) per peer])."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, list[tuple[int, int]]]] = []

    def sample(self, net: NamespaceNet) -> None:
        got = [net.link_bytes(i) for i in range(net.n)]
        if all(g is not None for g in got):
            self.samples.append((time.time(), [g for g in got if g is not None]))

    def at(self, ts: float | None) -> list[float | None]:
        """Sent + received per peer at ``ts`` (interpolated; the last sample when None)."""
        if not self.samples:
            return [None] * PEERS
        if ts is None:
            return [float(s + r) for s, r in self.samples[-1][1]]
        out: list[float | None] = []
        for i in range(len(self.samples[0][1])):
            points = [(t, float(sum(v[i]))) for t, v in self.samples]
            out.append(interp(points, ts) if ts <= points[-1][0] else points[-1][1])
        return out


def watch(running: Any, task: Task, stop_at_target: bool, deadline: float) -> dict[str, Any]:
    """Read the peers' events and veth counters until every peer has reached the target
    (then stop the run, unless not ``stop_at_target``), the launcher exits, or ``deadline``."""
    run_dir: Path = running.run_dir
    tails = [Tail(run_dir / f"peer-{i}" / "events.jsonl") for i in range(PEERS)]
    first: dict[int, float] = {}  # peer -> ts of its first eval at the target
    counters = Counters()
    net: NamespaceNet | None = None
    reached_ts: float | None = None
    while running.running() and time.time() < deadline:
        if net is None:
            info = read_peers_net(run_dir)
            if info is not None:
                net = NamespaceNet.attach(info)
        if net is not None:
            counters.sample(net)
        for i, tail in enumerate(tails):
            for e in tail.read():
                if (
                    e.get("kind") == "eval"
                    and i not in first
                    and task.hit(metric_of(e, task.metric))
                ):
                    first[i] = float(e["ts"])
        if reached_ts is None and len(first) == PEERS:
            reached_ts = max(first.values())
            log.info(
                "%s: every peer at the target, %.1f s after launch",
                run_dir.name,
                reached_ts - running.launched,
            )
            if stop_at_target:
                break
        time.sleep(POLL_S)
    timed_out = running.running() and time.time() >= deadline
    if running.running():
        running.stop()
    return {"reached_ts": reached_ts, "counters": counters, "timed_out": timed_out}


def read_peers_net(run_dir: Path) -> dict[str, Any] | None:
    """peers.json's network (mode netns), once the launcher has written it."""
    if not read_peers(run_dir):
        return None
    try:
        net: dict[str, Any] = json.loads((run_dir / "peers.json").read_text())["net"]
    except (OSError, ValueError, KeyError):
        return None
    return net if net.get("mode") == "netns" else None


def finished_launch(running: Any) -> Launch:
    """The run as ``common.Launch``: its summary.json, or, for a run stopped at the target
    (the launcher writes none then), one built from the run folder without the consensus."""
    running.watcher.done.set()
    running.watcher.join(timeout=5)
    run_dir: Path = running.run_dir
    if not (run_dir / "summary.json").is_file():
        run_summary.write(run_dir, consensus=False)
    offset = running.watcher.offset or 0.0
    rc = running.proc.returncode if running.proc.returncode is not None else -1
    exit_s = time.time() - running.launched
    return Launch(run_dir, running.launched, offset, exit_s, read_summary(run_dir), [], rc)


def bytes_at(run: Launch, peers: list[str], ts: float | None) -> dict[str, Any]:
    """Each peer's own counts, sent + received, at ``ts`` (time.time(); None: at its end):
    interpolated between its progress events (two a second) in progress.jsonl, with the
    per-kind split of the last one before ``ts`` where the peers report one."""
    prog = run.progress()
    t0 = float(read_json(run.run_dir / "run.json")["ts"])  # the launcher's clock zero
    total: list[float | None] = []
    kinds: list[dict[str, Any] | None] = []
    for p in peers:
        points = [e for e in prog.get(p, []) if e.get("kind", "progress") == "progress"]
        if not points:
            total.append(None)
            kinds.append(None)
            continue
        curve = [(t0 + e["t"], float(e["bytes_sent"] + e["bytes_received"])) for e in points]
        at = curve[-1][1] if ts is None or ts >= curve[-1][0] else interp(curve, ts)
        total.append(at if at is not None else 0.0)  # None: before its first progress event
        before = [e for e in points if ts is None or t0 + e["t"] <= ts]
        kinds.append(before[-1].get("bytes") if before else None)
    return {"total": total, "kinds": kinds if any(kinds) else None}


def reach(run: Launch, task: Task) -> dict[str, Any]:
    """When every peer had an eval at the target (seconds since launch) and at which step,
    with tta.py's (accuracy) or transformer.py's (loss) reading of the eval events."""
    if task.metric == "accuracy":
        r = tta.reach_times(run, task.target)
        t = run.since_launch(r["every_peer_t"]) if r["every_peer_t"] is not None else None
        curves = {
            p: [[s, round(run.since_launch(at), 3), a] for s, at, a in c]
            for p, c in r["curves"].items()
        }
        steps = r["step_of_last_peer"]
    else:
        r = transformer.reach_times(run, task.target)
        t, curves = r["every_peer_s"], r["curves"]
        steps = max(r["steps_each"]) if r["steps_each"] else None
    return {"time_s": t, "steps": steps, "curves": curves}


def gossip_run(task: Task, config: str, link: str, run_dir: Path, plan: Plan) -> dict[str, Any]:
    rate = link_rate(link)
    args = [
        "--netns",
        "--peers",
        str(PEERS),
        "--threads",
        "1",
        "--linger",
        "5",
        "--timeout",
        str(int(task.timeout)),
        *task.gossip,
        *CONFIGS[config],
    ]
    if rate is not None:
        args += ["--netns-rate", rate]
    load = load_now()
    running = start_local(run_dir, args, interval=None)
    try:
        seen = watch(running, task, plan.stop_at_target, running.launched + task.timeout + 60)
    finally:
        running.stop()
    run = finished_launch(running)
    prs = run.summary["peers"]
    names = [p["name"] for p in prs]
    r = reach(run, task)
    # The moment of the last peer's eval at the target, on the peers' own clock.
    # (The watch misses it only when the launcher ended between two of its reads.)
    at_ts = None
    if r["time_s"] is not None:
        at_ts = seen["reached_ts"] or run.launched + r["time_s"]
    started = [e["t"] for e in run.events("started")]
    start_s = run.since_launch(max(started)) if len(started) == PEERS else None
    app_at, app_end = bytes_at(run, names, at_ts), bytes_at(run, names, None)
    counters: Counters = seen["counters"]
    final = [(p.get("metrics") or {}).get(task.metric) for p in prs]
    last_eval = [c[-1][2] if c else None for c in r["curves"].values()]
    return {
        "task": task.name,
        "name": config,
        "link": link,
        "flags": list(CONFIGS[config]),
        "reached": r["time_s"] is not None,
        "time_to_target_s": r["time_s"],
        "from_training_start_s": r["time_s"] - start_s
        if r["time_s"] is not None and start_s is not None
        else None,
        "training_start_s": start_s,
        "steps_at_target": r["steps"],
        "steps": [p["steps"] for p in prs],
        "bytes_at_target": app_at["total"],
        "bytes_at_target_kinds": app_at["kinds"],
        "bytes_total": [_sum(p.get("bytes_sent"), p.get("bytes_received")) for p in prs],
        "bytes_total_kinds": [p.get("bytes") for p in prs]
        if any(p.get("bytes") for p in prs)
        else app_end["kinds"],
        "veth_bytes_at_target": counters.at(at_ts) if at_ts is not None else None,
        "veth_bytes_total": counters.at(None),
        "final_metric": final,
        "final_metric_worst": task.worst(final),
        "last_eval_metric": last_eval,
        "best_eval_metric_worst_peer": task.worst(
            [task.best([c[2] for c in cv]) for cv in r["curves"].values()]
        ),
        "exchanges": [p.get("exchanges") for p in prs],
        "statuses": [p["status"] for p in prs],
        "stopped_at_target": plan.stop_at_target and r["time_s"] is not None,
        "timed_out": seen["timed_out"],
        "launcher_rc": run.returncode,
        "wall_s": run.exit_s,
        "load_1m": [load, load_now()],
        "curves": r["curves"],
        "run_dir": str(run_dir),
    }


def _sum(*values: Any) -> float | None:
    return float(sum(values)) if all(isinstance(v, int | float) for v in values) else None


# -- one DDP run ----------------------------------------------------------------------------------
def ddp_run(task: Task, link: str) -> dict[str, Any]:
    """4 DDP (gloo) ranks, rank r inside namespace r, every link capped at ``link``."""
    rate = link_rate(link)
    net = NamespaceNet(PEERS, NetnsConfig())
    net.guard()
    load = load_now()
    try:
        net.create()
        if rate is not None:
            for i in range(PEERS):
                net.cap(i, rate)
        before = [net.link_bytes(i) for i in range(PEERS)]
        env = dict(
            os.environ,
            GLOO_SOCKET_IFNAME="eth0",
            OMP_NUM_THREADS="1",
            MASTER_ADDR=net.ip(0),
            MASTER_PORT=str(DDP_PORT),
        )
        launched = time.time()
        job = [
            "--world",
            str(PEERS),
            "--init",
            "env://",
            "--launch",
            repr(launched),
            "--target",
            f"{task.target:g}",
            # The ranks stop themselves at the budget, so a run that does not reach the
            # target still says how far it got (its last evaluation).
            "--max-seconds",
            f"{task.timeout:g}",
            *task.ddp,
        ]
        cmds = [
            [*net.exec_argv(r), *python_cmd(), str(BENCH_DIR / task.worker), "--rank", str(r), *job]
            for r in range(PEERS)
        ]
        results = run_ranks(
            cmds,
            env,
            launched + task.timeout + DDP_GRACE,
            lambda out, rank: require_result(out, f"DDP rank {rank}"),
        )
        wall = time.time() - launched
        after = [net.link_bytes(i) for i in range(PEERS)]
    finally:
        net.close()
    r0 = results[0]
    reached = r0["reached"]  # [epochs or step, seconds since launch, metric] or None
    first_step = r0.get("startup_s", r0.get("first_step_s"))
    veth = [
        float(sum(a) - sum(b)) if a is not None and b is not None else None
        for a, b in zip(after, before, strict=True)
    ]
    curve = r0["curve"]
    return {
        "task": task.name,
        "name": DDP,
        "link": link,
        "flags": [],
        "reached": reached is not None,
        "time_to_target_s": reached[1] if reached else None,
        "from_training_start_s": reached[1] - first_step if reached and first_step else None,
        "training_start_s": first_step,
        "steps_at_target": None
        if reached is None
        else (round(reached[0] * MNIST_STEPS_PER_EPOCH) if task.name == "mnist" else reached[0]),
        "steps": [r["steps"] for r in results],
        # gloo counts nothing itself: its bytes are the veth counters, which here also hold
        # the rendezvous and the teardown (a few kB).
        "bytes_at_target": veth,
        "bytes_at_target_kinds": None,
        "bytes_total": veth,
        "bytes_total_kinds": None,
        "veth_bytes_at_target": veth,
        "veth_bytes_total": veth,
        "final_metric": [curve[-1][2] if curve else None] * PEERS,  # the ranks hold one model
        "final_metric_worst": curve[-1][2] if curve else None,
        "last_eval_metric": [curve[-1][2] if curve else None] * PEERS,
        "best_eval_metric_worst_peer": task.best([c[2] for c in curve]),
        "stopped_at_target": reached is not None,
        "timed_out": reached is None and wall >= task.timeout,
        "last_eval": curve[-1] if curve else None,  # [step or epochs, s since launch, metric]
        "wall_s": wall,
        "load_1m": [load, load_now()],
        "curves": {"rank-0": curve},
    }


# -- the matrix -----------------------------------------------------------------------------------
def gossip_job(
    task: Task, config: str, link: str, runs: Runs, label: str, plan: Plan
) -> dict[str, Any]:
    return gossip_run(task, config, link, runs.next(label), plan)


def key(task: str, name: str, link: str) -> str:
    return f"{task}/{name}/{link}"


def measure(
    plan: Plan,
    tasks: dict[str, Task],
    runs: Runs,
    done: Callable[[dict[str, list[dict[str, Any]]]], None] = lambda reps: None,
) -> dict[str, Any]:
    """Every job of ``plan``, rep by rep; ``done(reps)`` after each (a partial record)."""
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for t in plan.tasks:
        task = tasks[t]
        # DDP at every link of --ddp-links, before the gossip runs of that link.
        for link in dict.fromkeys([*plan.links, *plan.ddp_links]):
            if link in plan.ddp_links:
                ddp_task = task
                if plan.ddp_timeout is not None:
                    ddp_task = replace(task, timeout=plan.ddp_timeout)
                jobs.append((key(t, DDP, link), partial(ddp_run, ddp_task, link)))
            if link not in plan.links:
                continue
            for c in plan.configs:
                label = f"{t}-{c.replace('+', '-')}-{link}"
                jobs.append(
                    (key(t, c, link), partial(gossip_job, task, c, link, runs, label, plan))
                )
    reps: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in jobs}
    for rep in range(plan.reps):
        for k, job in jobs:
            log.info("rep %d/%d: %s starts (load %.1f)", rep + 1, plan.reps, k, load_now())
            t0 = time.monotonic()
            try:
                r = job()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log.warning("%s failed: %s", k, exc)
                r = {"key": k, "reached": False, "time_to_target_s": None, "error": str(exc)}
            reps[k].append(r)
            log.info(
                "rep %d/%d: %s done in %.0f s: %s",
                rep + 1,
                plan.reps,
                k,
                time.monotonic() - t0,
                fmt(r.get("time_to_target_s"), ".1f", "not reached"),
            )
            done(reps)
    rows = {k: row(rs) for k, rs in reps.items()}
    return {"rows": rows, "ratios": ratios(plan, reps, rows), "reps": reps}


def _mean(values: Sequence[float | None] | None) -> float | None:
    got = [v for v in values or [] if v is not None]
    return sum(got) / len(got) if got else None


def row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the reps of one (task, run, link)."""
    ok = [r for r in results if "error" not in r]
    return {
        "n": len(results),
        "reached": sum(1 for r in results if r.get("reached")),
        "errors": [r["error"] for r in results if "error" in r],
        "time_to_target_s": median([r["time_to_target_s"] for r in results]),
        "times_s": [r.get("time_to_target_s") for r in results],
        "from_training_start_s": median([r.get("from_training_start_s") for r in ok]),
        "steps_at_target": median([r.get("steps_at_target") for r in ok]),
        "steps": median([_mean(r.get("steps")) for r in ok]),
        "mb_per_peer_at_target": _mb(median([_mean(r.get("bytes_at_target")) for r in ok])),
        "mb_per_peer_total": _mb(median([_mean(r.get("bytes_total")) for r in ok])),
        "veth_mb_per_peer_at_target": _mb(
            median([_mean(r.get("veth_bytes_at_target")) for r in ok])
        ),
        "veth_mb_per_peer_total": _mb(median([_mean(r.get("veth_bytes_total")) for r in ok])),
        "kinds_at_target_last_rep": ok[-1].get("bytes_at_target_kinds") if ok else None,
        "final_metric_worst": median([r.get("final_metric_worst") for r in ok]),
        "best_eval_metric_worst_peer": median([r.get("best_eval_metric_worst_peer") for r in ok]),
        "load_1m": [r["load_1m"][0] for r in ok],
        "wall_s": median([r.get("wall_s") for r in ok]),
        "last_eval_last_rep": ok[-1].get("last_eval") if ok else None,
    }


def _mb(v: float | None) -> float | None:
    return v / 1e6 if v is not None else None


def ratios(
    plan: Plan, reps: dict[str, list[dict[str, Any]]], rows: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per task and run: bytes against fp32 on the same link; time at 10mbit against
    unlimited, and against DDP at 10mbit (both paired by rep)."""
    out: dict[str, Any] = {}
    for t in plan.tasks:
        for name in [*plan.configs, DDP]:
            entry: dict[str, Any] = {}
            for link in plan.links:
                mine, base = rows.get(key(t, name, link)), rows.get(key(t, "fp32", link))
                if (
                    mine
                    and base
                    and mine["mb_per_peer_at_target"]
                    and base["mb_per_peer_at_target"]
                ):
                    entry[f"bytes_vs_fp32@{link}"] = (
                        mine["mb_per_peer_at_target"] / base["mb_per_peer_at_target"]
                    )
            pairs = [
                (key(t, name, "10mbit"), key(t, name, UNLIMITED)),
                (key(t, name, "10mbit"), key(t, DDP, "10mbit")),
            ]
            paired = paired_ratios(reps, [p for p in pairs if p[0] != p[1]])
            for (a, b), label in zip(pairs, ("10mbit_vs_unlimited", "vs_ddp@10mbit"), strict=True):
                got = paired.get(f"{a} / {b}")
                if got is not None:
                    entry[label] = got["median"]
            if entry:
                out[key(t, name, "*")] = entry
    return out


# -- output ---------------------------------------------------------------------------------------
def tables(result: dict[str, Any], plan: Plan, tasks: dict[str, Task]) -> list[str]:
    rows, rat = result["rows"], result["ratios"]
    out = []
    for t in plan.tasks:
        task = tasks[t]
        names = [DDP, *plan.configs]
        links = list(dict.fromkeys([*plan.links, *plan.ddp_links]))
        detail = []
        for name in names:
            for link in links:
                m = rows.get(key(t, name, link))
                if m is None:
                    continue
                r = rat.get(key(t, name, "*"), {})
                cell = fmt(m["time_to_target_s"], ".1f", "not reached")
                if m["time_to_target_s"] is None and m.get("wall_s") is not None:
                    cell += f" in {m['wall_s']:.0f} s"
                if m["time_to_target_s"] is None and m["best_eval_metric_worst_peer"] is not None:
                    cell += f" (best {m['best_eval_metric_worst_peer']:.3f})"
                detail.append(
                    [
                        name,
                        link,
                        cell,
                        ", ".join(fmt(x, ".1f", "n/r") for x in m["times_s"]),
                        fmt(m["from_training_start_s"], ".1f"),
                        f"{m['reached']}/{m['n']}",
                        fmt(m["steps_at_target"], ".0f"),
                        fmt(m["mb_per_peer_at_target"], ".1f"),
                        fmt(m["veth_mb_per_peer_at_target"], ".1f"),
                        fmt(r.get(f"bytes_vs_fp32@{link}"), ".2f"),
                        fmt(m["final_metric_worst"], ".4f" if task.metric == "accuracy" else ".3f"),
                        ", ".join(f"{x:.1f}" for x in m["load_1m"]),
                    ]
                )
        table = markdown_table(
            [
                "run",
                "link",
                f"time to {task.label()}, every peer (s)",
                "each rep (s)",
                "from training start (s)",
                "reached",
                "steps per peer at target",
                "MB per peer at target (own count, sent+recv)",
                "MB per peer (veth)",
                "bytes vs fp32",
                f"final {task.metric} (worst peer)",
                "load at start",
            ],
            detail,
        )
        summary = []
        for name in names:
            times = [rows.get(key(t, name, link)) for link in links]
            if not any(times):
                continue
            r = rat.get(key(t, name, "*"), {})
            summary.append(
                [
                    name,
                    *[fmt(m["time_to_target_s"] if m else None, ".1f") for m in times],
                    fmt(r.get("10mbit_vs_unlimited"), ".2f"),
                    fmt(r.get("vs_ddp@10mbit"), ".2f"),
                ]
            )
        overview = markdown_table(
            ["run", *[f"{link} (s)" for link in links], "10mbit / unlimited", "vs DDP at 10mbit"],
            summary,
        )
        out.append(
            f"### {t}: time to {task.label()} over capped links, {PEERS} peers\n\n"
            f"{table}\n\n{overview}"
        )
    if plan.skipped:
        notes = "; ".join(f"{c} (needs {' '.join(f)})" for c, f in plan.skipped.items())
        out.append(f"Skipped, flags missing from `gossip-train local`: {notes}")
    return out


def parse_list(text: str, allowed: Sequence[str] | None, what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(
                f"slowlink.py: {what}: unknown {bad}; choose from {', '.join(allowed)}"
            )
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-sized: mnist to 90%% in <= 1 epoch, shakespeare to 3.0 in 150 steps; "
        "alone: mnist at unlimited and 10mbit, DDP at 10mbit",
    )
    parser.add_argument(
        "--tasks", default=None, help="mnist,shakespeare (default both; --quick: mnist)"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--links",
        default=None,
        help="comma-separated: unlimited or a tc rate (default unlimited,100mbit,10mbit; "
        "--quick: unlimited,10mbit)",
    )
    parser.add_argument(
        "--ddp-links",
        default=None,
        help="links of the DDP baseline (default: --links; --quick: 10mbit; 'none': no DDP)",
    )
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions (default 1)")
    parser.add_argument(
        "--run-to-end",
        action="store_true",
        help="let every gossip run train its whole budget (default: stop it "
        "once every peer has reached the target)",
    )
    parser.add_argument("--data", default=str(DEFAULT_MNIST), help="MNIST folder")
    parser.add_argument("--keep", type=Path, default=None, help="keep run dirs here (else temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one run may take (default: the task's); a run stopped by it is "
        "reported as not reached",
    )
    parser.add_argument(
        "--ddp-timeout",
        type=float,
        default=None,
        help="seconds one DDP run may take (default: --timeout); one stopped by it is "
        "reported as not reached, with how far it got",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    # --quick alone is the smoke run: mnist, fp32 (and whatever else exists) at two links,
    # DDP at 10mbit only; any of these flags given explicitly wins.
    links = parse_list(
        args.links or ",".join(QUICK_LINKS if args.quick else LINKS), None, "--links"
    )
    ddp_default = (
        ",".join(QUICK_DDP_LINKS) if args.quick and args.links is None else ",".join(links)
    )
    ddp_links = parse_list(args.ddp_links or ddp_default, None, "--ddp-links")
    ddp_links = tuple(x for x in ddp_links if x != "none")
    for link in (*links, *ddp_links):
        try:
            link_rate(link)
        except ValueError as exc:
            sys.exit(f"slowlink.py: {exc}")
    tasks_default = "mnist" if args.quick else "mnist,shakespeare"
    task_names = parse_list(args.tasks or tasks_default, ("mnist", "shakespeare"), "--tasks")
    if "mnist" in task_names and not Path(args.data).is_dir():
        sys.exit(f"slowlink.py: MNIST folder {args.data} not found (see --data)")
    ok, why = netns_available()
    if not ok:
        sys.exit(f"slowlink.py: {why}")
    configs, skipped = runnable(parse_list(args.configs, list(CONFIGS), "--configs"), local_flags())
    for name, missing in skipped.items():
        print(
            f"slowlink.py: skipping {name}: gossip-train local has no {' '.join(missing)}",
            file=sys.stderr,
        )
    plan = Plan(
        task_names,
        tuple(configs),
        links,
        ddp_links,
        max(1, args.reps),
        not args.run_to_end,
        skipped,
        args.ddp_timeout,
    )
    tasks = make_tasks(args.quick, args.data)
    if args.timeout is not None:
        tasks = {k: replace(t, timeout=args.timeout) for k, t in tasks.items()}
    work = args.keep or Path(tempfile.mkdtemp(prefix="gossip-bench-slowlink-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "slowlink",
        "command": command_line(),
        "machine": machine_info(),
        "config": {
            "plan": asdict(plan),
            "tasks": {t: asdict(tasks[t]) for t in plan.tasks},
            "configs": {c: list(CONFIGS[c]) for c in plan.configs},
            "peers": PEERS,
            "tbf": tbf_note(),
        },
    }
    t0 = time.monotonic()
    partial_json = args.json.with_suffix(".partial.json") if args.json is not None else None

    def save_partial(reps: dict[str, list[dict[str, Any]]]) -> None:
        # A long matrix stopped midway keeps what it measured (the finished runs, raw).
        if partial_json is not None:
            partial_json.write_text(json.dumps({**result, "partial_reps": reps}, indent=1))

    try:
        result["slowlink"] = measured = measure(plan, tasks, Runs(work), save_partial)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.monotonic() - t0
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["machine"]["commit_at_end"] = code_version()
    emit(result, tables(measured, plan, tasks), args.json)
    if partial_json is not None:
        partial_json.unlink(missing_ok=True)


def tbf_note() -> dict[str, Any]:
    return {
        "burst_seconds": BURST_SECONDS,
        "min_burst_bytes": MIN_BURST,
        "latency": NetnsConfig().tbf_latency,
    }


if __name__ == "__main__":
    main()
