"""Peer settings from a Slurm allocation: ``srun gossip-train peer --slurm ...``.

Pure functions of the environment (no torch, no network), so the CLI, ``GossipOptimizer``
and the tests share them: the node list expanded as ``scontrol show hostnames`` does, the
tasks-per-node string (``2(x3),1``) parsed, and from those every task's index, port and
seeds. Task ``i`` on a node listens on ``port_base + SLURM_LOCALID``; every task names
every task of the step (itself included: the agent drops its own address) as a seed, so
the swarm forms however the tasks start.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT_BASE = 7400
# What `--slurm` auto-detection requires: the three variables srun sets in every task.
REQUIRED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
# Seconds to keep trying the seeds: tasks of one step start within seconds of each other,
# but a node that boots a container or mounts a home folder can lag by tens of seconds.
JOIN_TIMEOUT = 60.0
# Upper bound on a finished task's linger, as in the launchers (LaunchConfig.linger).
LINGER = 60.0

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


class SlurmError(ValueError):
    """A Slurm variable this peer cannot use (an empty node list, a malformed range)."""


def detected(env: Mapping[str, str]) -> bool:
    """True inside an srun task: every variable of ``REQUIRED`` is set."""
    return all(env.get(k) for k in REQUIRED)


def _split_top(text: str) -> list[str]:
    """Split on commas and whitespace outside brackets (``a,b[1,3]`` -> ``a``, ``b[1,3]``)."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise SlurmError(f"bad host list {text!r}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SlurmError(f"bad host list {text!r}: ']' without '['")
            depth = 0
        elif (ch == "," or ch.isspace()) and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"bad host list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in parts if p]


def _range(spec: str, whole: str) -> list[str]:
    """``01-03`` -> 01, 02, 03; the lower bound's digits set the width (as Slurm's)."""
    lo, sep, hi = spec.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise SlurmError(f"bad host list {whole!r}: range {spec!r} is not N or N-M")
    if not sep:
        return [lo]
    a, b = int(lo), int(hi)
    if b < a:
        raise SlurmError(f"bad host list {whole!r}: range {spec!r} runs backwards")
    if b - a >= 1 << 16:
        raise SlurmError(f"bad host list {whole!r}: range {spec!r} is too long")
    return [str(n).zfill(len(lo)) for n in range(a, b + 1)]


def _expand_one(part: str, whole: str) -> list[str]:
    pieces = _GROUP.split(part)  # text, group, text, group, ..., text
    if len(pieces) > 1 and pieces[-1]:
        # Slurm 22.05 refuses text after the last bracket (`a[1-3]b`): so do we.
        raise SlurmError(f"bad host list {whole!r}: text after ']' in {part!r}")
    names = [pieces[0]]
    for i in range(1, len(pieces), 2):
        values = [v for spec in pieces[i].split(",") for v in _range(spec, whole)]
        # Several bracket groups multiply out, the first varying slowest (rack1-n01, ...).
        names = [n + v + pieces[i + 1] for n in names for v in values]
    return names


def expand_hostlist(text: str) -> list[str]:
    """A Slurm host list as ``scontrol show hostnames`` prints it, in order, duplicates kept:
    ``n[01-03,7]`` -> n01 n02 n03 n7; ``rack[1-2]-n[01-02]`` -> rack1-n01 rack1-n02 ..."""
    names = [n for part in _split_top(text.strip()) for n in _expand_one(part, text)]
    if not names:
        raise SlurmError("empty host list (SLURM_JOB_NODELIST)")
    return names


def parse_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> tasks on each node in order: [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        m = _COUNT.fullmatch(part.strip())
        if m is None:
            raise SlurmError(f"bad tasks per node {text!r}: expected N or N(xK), comma-separated")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


@dataclass(frozen=True)
class SlurmSettings:
    index: int
    num_peers: int
    listen: str
    advertise: str
    join: tuple[str, ...]
    run_dir: str
    checkpoint_dir: str
    job_dir: str


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    if value is None or not value.strip().isdigit():
        raise SlurmError(f"{key}={value!r}: expected a non-negative integer")
    return int(value)


def _var(env: Mapping[str, str], *keys: str) -> str | None:
    """The first of ``keys`` that is set: a step's own variables before the job's."""
    for key in keys:
        if env.get(key):
            return env[key]
    return None


def settings(
    env: Mapping[str, str], port_base: int = DEFAULT_PORT_BASE, hostname: str | None = None
) -> SlurmSettings:
    """This task's peer settings from srun's variables (see the module's docstring)."""
    if not detected(env):
        missing = [k for k in REQUIRED if not env.get(k)]
        raise SlurmError(f"not inside a Slurm task: {', '.join(missing)} not set")
    if not 0 < port_base < 65536:
        raise SlurmError(f"--slurm-port-base {port_base}: not a port")
    index = _int(env, "SLURM_PROCID")
    ntasks = _int(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else 0
    ntasks = ntasks or _int(env, "SLURM_NTASKS")
    if not index < ntasks:
        raise SlurmError(f"SLURM_PROCID {index} is not below SLURM_NTASKS {ntasks}")
    hosts = expand_hostlist(_var(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") or "")
    per_node_text = _var(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    # Without the variable: spread as evenly as srun's block distribution would.
    per_node = (
        parse_tasks_per_node(per_node_text)
        if per_node_text
        else [ntasks // len(hosts) + (i < ntasks % len(hosts)) for i in range(len(hosts))]
    )
    if len(per_node) != len(hosts):
        raise SlurmError(
            f"tasks per node {per_node_text!r} lists {len(per_node)} nodes, "
            f"the node list {len(hosts)}"
        )
    if port_base + max(per_node) - 1 > 65535:
        raise SlurmError(f"--slurm-port-base {port_base} + {max(per_node)} tasks runs past 65535")
    pairs = zip(hosts, per_node, strict=True)
    seeds = [f"{h}:{port_base + local}" for h, n in pairs for local in range(n)]
    # The node's name as the node list spells it, so our own seed entry is our address.
    host = env.get("SLURMD_NODENAME") or hostname or socket.gethostname()
    port = port_base + _int(env, "SLURM_LOCALID", "0")
    job = env.get("SLURM_JOB_ID") or "0"
    submit = env.get("SLURM_SUBMIT_DIR") or os.getcwd()
    job_dir = Path(submit) / f"gossip-train-{job}"
    run_dir = job_dir / f"peer-{index}"
    return SlurmSettings(
        index=index,
        num_peers=ntasks,
        listen=f"0.0.0.0:{port}",
        advertise=f"{host}:{port}",
        join=tuple(dict.fromkeys(seeds)),
        run_dir=str(run_dir),
        checkpoint_dir=str(run_dir / "checkpoints"),
        job_dir=str(job_dir),
    )
