"""Command-line flags shared by the commands (`peer`, `local`, `run`, `eval`), and the one
way they become a ``PeerConfig``. Defaults are not repeated here: a flag left out keeps the
config dataclass's own default, and the help texts read it from there."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from gossip.policy import ScheduleConfig

from .config import CheckpointConfig, LaunchConfig, PeerConfig, TrainConfig
from .launch import k8s, slurm
from .runtime import UserError

# Set to 0 in a process's environment: no Slurm auto-detection there (the launchers' peers).
SLURM_OFF_ENV = "GOSSIP_TRAIN_SLURM"

T, G, C, P, L = TrainConfig(), ScheduleConfig(), CheckpointConfig(), PeerConfig(), LaunchConfig()
# First metrics port of `local --metrics` / `run --metrics` (examples/prometheus.yml scrapes
# 9400-9403).
DEFAULT_METRICS_PORT = 9400


def add_task_arg(g: Any) -> None:
    g.add_argument(
        "--task",
        metavar="NAME_OR_FILE",
        help="what to train: a built-in task (classifier, shakespeare) or a task file "
        "(my_task.py defining model() and data(peer, peers); see docs/api.md). "
        "Default: classifier, set by --dataset and --model",
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    add_task_arg(g)
    g.add_argument(
        "--dataset",
        choices=("default", "mnist", "fashion-mnist"),
        help=f"data set (default {T.dataset}: the small MNIST subset shipped in the package)",
    )
    g.add_argument("--data-dir", help="folder with the IDX files for mnist / fashion-mnist")
    g.add_argument(
        "--model", choices=("mlp", "cnn"), help=f"model (default {T.model}; mlp is 784-128-10)"
    )
    g.add_argument(
        "--partition", help=f"iid or dirichlet:ALPHA for non-iid shards (default {T.partition})"
    )
    g.add_argument(
        "--epochs", type=float, help="passes over each peer's own shard (default: the task's, or 1)"
    )
    g.add_argument(
        "--steps", type=int, help="local steps per peer; overrides --epochs (default: the task's)"
    )
    g.add_argument("--batch-size", type=int, help="minibatch size (default: the task's, or 32)")
    g.add_argument(
        "--lr", type=float, help="learning rate for the task's optimizer (default: the task's)"
    )
    g.add_argument(
        "--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (default: off)"
    )
    g.add_argument(
        "--loader-workers",
        type=int,
        metavar="N",
        help=f"DataLoader worker processes fetching batches (default {T.loader_workers}: "
        "the training thread)",
    )
    g.add_argument("--device", help=f"cpu, cuda, cuda:N or auto (default {T.device})")
    g.add_argument("--seed", type=int, help=f"base seed (default {T.seed})")
    g.add_argument(
        "--threads", type=int, help="torch threads per peer (default max(1, cores // local peers))"
    )
    g.add_argument(
        "--period", type=int, help=f"local steps between exchanges (default {G.period_steps})"
    )
    g.add_argument(
        "--gossip-budget",
        type=float,
        metavar="SHARE",
        help=f"CPU gossip may use while training, in cores (default {G.time_budget}; 0: no limit)",
    )
    g.add_argument(
        "--compress",
        choices=("none", "fp16", "bf16", "int8"),
        help="weights on the wire: none (float32), fp16, bf16, or int8 (blockwise, a scale "
        "per 256 values), with error feedback (default none; every peer the same)",
    )
    g.add_argument(
        "--outer-steps",
        type=int,
        metavar="H",
        help="infrequent averaging: take H local steps, then an outer Nesterov step on the "
        "gossip-averaged outer weights, DiLoCo-style (default 0: off, plain gossip)",
    )
    g.add_argument("--outer-lr", type=float, help="outer learning rate (default 0.7)")
    g.add_argument("--outer-momentum", type=float, help="outer Nesterov momentum (default 0.9)")
    g.add_argument(
        "--link-rate",
        type=float,
        metavar="MB/S",
        help="slowest link's rate in MB/s, for exchange deadlines (default 20; set it lower "
        "over slow links, or exchanges of large models time out)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        metavar="STEPS",
        help="evaluate the task's metrics every STEPS steps as 'eval' events (default: at the end)",
    )


def add_secret_arg(g: Any) -> None:
    g.add_argument(
        "--secret-file",
        metavar="FILE",
        help="the swarm's keyring: one secret per line (>= 16 bytes; the first is used to call, "
        "all are accepted); every connection is authenticated and encrypted with it. "
        "`gossip-train secret > FILE` makes one",
    )


def add_net_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    add_secret_arg(g)
    g.add_argument("--cluster", help="swarm name; peers of other clusters are refused")
    g.add_argument(
        "--profile",
        choices=("local", "lan", "wan", "test"),
        help=f"membership timing profile (default {P.profile})",
    )


def add_checkpoint_args(p: argparse.ArgumentParser, *dir_flag: str) -> None:
    g = p.add_argument_group("checkpoints")
    for flag in dir_flag:
        g.add_argument(flag, help="folder for checkpoints; resumes from its newest good one")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help=f"checkpoint every this many steps (default {C.every_steps})",
    )
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        metavar="SECONDS",
        help=f"... or every this many seconds, whichever comes first (default {C.every_seconds:g})",
    )
    g.add_argument(
        "--checkpoint-keep", type=int, metavar="K", help=f"checkpoint files kept (default {C.keep})"
    )


def add_monitor_args(p: argparse.ArgumentParser, launcher: bool = False) -> None:
    """Live metrics and TensorBoard (docs/monitoring.md)."""
    g = p.add_argument_group("monitoring")
    if launcher:
        g.add_argument(
            "--metrics",
            type=int,
            nargs="?",
            const=DEFAULT_METRICS_PORT,
            metavar="BASE_PORT",
            help="each peer serves Prometheus metrics on consecutive ports from BASE_PORT "
            f"(default {DEFAULT_METRICS_PORT}), listed in RUN_DIR/metrics.json; "
            "needs gossip-train[metrics]",
        )
    else:
        g.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="serve Prometheus metrics at http://LISTEN_HOST:PORT/metrics "
            "(needs gossip-train[metrics])",
        )
    g.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write TensorBoard scalars into DIR, one run per peer "
        "(needs gossip-train[tensorboard])",
    )


# Set to 0 in the environment: the launchers skip report.html, as --no-report does.
REPORT_ENV = "GOSSIP_TRAIN_REPORT"


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """Flags of the launchers, `local` and `run`."""
    p.add_argument(
        "--peers", type=int, default=L.peers, help=f"number of peers (default {L.peers})"
    )
    p.add_argument("--run-dir", help="where results go (default runs/<date-time>)")
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not draw RUN_DIR/report.html at the end (a few seconds of plotting; "
        f"also {REPORT_ENV}=0); `gossip-train report RUN_DIR` draws it later",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of peer settings every peer starts from ([train], [gossip], "
        "[gossip.robust], [schedule], ...: see examples/peer.toml); flags override it",
    )
    p.add_argument(
        "--base-port",
        type=int,
        default=0,
        help="first port; peers use consecutive ports (default: free ports)",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=None,
        help="at most this many seconds a finished peer keeps averaging while others still "
        f"train (default {L.linger:g}; {L.chaos_linger:g} with faults)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress view")
    p.add_argument(
        "--timeout",
        type=float,
        default=L.timeout,
        help=f"stop the run after this many seconds (default {L.timeout:g})",
    )
    p.add_argument(
        "--checkpoints",
        action="store_true",
        help="each peer checkpoints into RUN_DIR/peer-<i>/checkpoints",
    )
    p.add_argument(
        "--restart-failed",
        action="store_true",
        help="restart a crashed peer from its checkpoint (implies --checkpoints); finished "
        "peers then wait RESTART_DELAY + 5 s without training offers before they leave",
    )
    p.add_argument(
        "--restart-delay",
        type=float,
        default=L.restart_delay,
        help=f"seconds before a restart (default {L.restart_delay:g})",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=L.max_restarts,
        metavar="N",
        help=f"with --restart-failed, give up on a peer after N restarts "
        f"(default {L.max_restarts})",
    )


# Flags of add_train_args that fill TrainConfig fields of the same name.
TRAIN_KEYS = (
    "task",
    "steps",
    "clip_grad",
    "loader_workers",
    "device",
    "dataset",
    "data_dir",
    "model",
    "partition",
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "threads",
    "eval_every",
)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None}


def index_arg(text: str) -> int | str:
    """``--index``: a number, or ``auto`` (the StatefulSet ordinal of this host's name)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm")
    g.add_argument(
        "--slurm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take --index, --num-peers, --listen, --advertise, --join, --run-dir and "
        "--checkpoint-dir from srun's SLURM_* variables (flags still override). Default: on "
        "when SLURM_PROCID, SLURM_NTASKS and SLURM_JOB_NODELIST are all set and "
        f"{SLURM_OFF_ENV} is not 0; --no-slurm turns it off",
    )
    g.add_argument(
        "--slurm-port-base",
        type=int,
        default=slurm.DEFAULT_PORT_BASE,
        metavar="PORT",
        help="under Slurm, task LOCALID listens on PORT + LOCALID on its node "
        f"(default {slurm.DEFAULT_PORT_BASE})",
    )


def slurm_wanted(flag: bool | None, env: Mapping[str, str]) -> bool:
    """--slurm / --no-slurm, else auto-detection (which the launchers turn off for their
    own peers through SLURM_OFF_ENV: a `gossip-train local` inside a job is not N tasks)."""
    if flag is not None:
        return flag
    return env.get(SLURM_OFF_ENV) != "0" and slurm.detected(env)


def slurm_defaults(cfg: PeerConfig, env: Mapping[str, str], port_base: int) -> PeerConfig:
    """``cfg`` with what Slurm tells this task: its index, the step's size, its address and
    every task's as seeds, a folder in the job's, and checkpoints on (a requeued task resumes
    from them)."""
    s = slurm.settings(env, port_base)
    return dataclasses.replace(
        cfg,
        index=s.index,
        num_peers=s.num_peers,
        listen=s.listen,
        advertise=s.advertise,
        join=s.join,
        run_dir=s.run_dir,
        join_timeout=max(cfg.join_timeout, slurm.JOIN_TIMEOUT),
        wait_peers=s.num_peers,
        linger_seconds=cfg.linger_seconds or slurm.LINGER,
        checkpoint=dataclasses.replace(
            cfg.checkpoint, directory=cfg.checkpoint.directory or s.checkpoint_dir
        ),
    )


def peer_config(args: argparse.Namespace) -> Any:
    from .config import PeerConfig, load_toml

    cfg = load_toml(args.config) if getattr(args, "config", None) else PeerConfig()
    if hasattr(args, "slurm") and slurm_wanted(args.slurm, os.environ):
        cfg = slurm_defaults(cfg, os.environ, args.slurm_port_base)
    top: dict[str, Any] = {}
    for key in (
        "listen",
        "advertise",
        "name",
        "index",
        "num_peers",
        "run_dir",
        "cluster",
        "profile",
        "join_timeout",
        "wait_peers",
        "metrics_port",
        "tensorboard",
    ):
        if getattr(args, key, None) is not None:
            top[key] = getattr(args, key)
    if getattr(args, "allow_control", False):
        top["allow_control"] = True
    if getattr(args, "secret_file", None):
        top["secret_file"] = args.secret_file
    if getattr(args, "insecure", False):
        top["insecure"] = True
    if getattr(args, "linger", None) is not None:
        top["linger_seconds"] = args.linger
    if getattr(args, "join", None):
        top["join"] = tuple(a.strip() for a in args.join.split(",") if a.strip())
    train = dataclasses.replace(cfg.train, **train_overrides(args))
    ckpt: dict[str, Any] = {}
    for flag, key in (
        ("checkpoint_dir", "directory"),
        ("checkpoint_every", "every_steps"),
        ("checkpoint_seconds", "every_seconds"),
        ("checkpoint_keep", "keep"),
    ):
        if getattr(args, flag, None) is not None:
            ckpt[key] = getattr(args, flag)
    top["checkpoint"] = dataclasses.replace(cfg.checkpoint, **ckpt)
    schedule = cfg.schedule
    if getattr(args, "period", None) is not None:
        schedule = dataclasses.replace(schedule, period_steps=args.period)
    if getattr(args, "gossip_budget", None) is not None:
        schedule = dataclasses.replace(schedule, time_budget=args.gossip_budget)
    gossip = cfg.gossip
    if getattr(args, "compress", None) is not None:
        gossip = dataclasses.replace(gossip, compress=args.compress)
    if getattr(args, "link_rate", None) is not None:
        if not args.link_rate > 0:
            raise UserError(f"--link-rate must be positive, got {args.link_rate}")
        gossip = dataclasses.replace(gossip, deadline_min_rate=args.link_rate * 1e6)
    outer = cfg.outer
    for flag, key in (("outer_steps", "steps"), ("outer_lr", "lr"), ("outer_momentum", "momentum")):
        if getattr(args, flag, None) is not None:
            outer = dataclasses.replace(outer, **{key: getattr(args, flag)})
    if top.get("index") == "auto":
        top["index"] = k8s.own_ordinal(top.get("num_peers", cfg.num_peers))
    return dataclasses.replace(
        cfg, train=train, schedule=schedule, gossip=gossip, outer=outer, **top
    )


def validate(cfg: Any) -> None:
    from p2p import dns
    from p2p.transport import parse_addr

    from .partition import parse_scheme

    for addr in (cfg.listen, cfg.advertise, *cfg.join):
        if addr is not None and dns.is_dns(addr):
            dns.parse(addr)
        elif addr is not None:
            parse_addr(addr)
    if cfg.secret_file is not None:
        from p2p.secure import Keyring

        Keyring.from_file(cfg.secret_file)  # unreadable, empty, too short: one line, now
    elif not cfg.insecure and not is_loopback(parse_addr(cfg.listen)[0]):
        raise UserError(
            f"--listen {cfg.listen} is reachable from other hosts: give --secret-file FILE "
            "(`gossip-train secret > FILE` makes one; copy it to every peer) or --insecure"
        )
    parse_scheme(cfg.train.partition)
    if not 0 <= cfg.index < cfg.num_peers:
        raise UserError(f"--index {cfg.index} must be in [0, --num-peers {cfg.num_peers})")
    t = cfg.train
    for flag, value in (
        ("--epochs", t.epochs),
        ("--steps", t.steps),
        ("--batch-size", t.batch_size),
        ("--lr", t.lr),
    ):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if (t.clip_grad or 0) < 0 or t.loader_workers < 0:
        raise UserError("--clip-grad and --loader-workers must not be negative")
    if cfg.schedule.period_steps < 1:
        raise UserError("--period must be at least 1")
    if not 0 <= cfg.schedule.time_budget <= 64:
        raise UserError("--gossip-budget must be between 0 and 64 (cores)")
    if cfg.linger_seconds < 0:
        raise UserError("--linger must not be negative")
    o = cfg.outer
    if o.steps < 0 or not o.lr > 0 or not 0 <= o.momentum < 1:
        raise UserError(
            "--outer-steps must not be negative, --outer-lr must be positive and "
            "--outer-momentum in [0, 1)"
        )
    if cfg.wait_peers < 0 or cfg.join_timeout < 0:
        raise UserError("--wait-peers and --join-timeout must not be negative")
    if cfg.metrics_port:
        from . import metrics

        metrics.check_port(cfg.metrics_port)
        metrics.require()
    if cfg.tensorboard is not None:
        from . import board

        board.require()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
