"""The ``gossip-train`` command line.

    gossip-train local --peers 4                 N peers on this machine, one process each
    gossip-train peer --listen H:P --join H:P    one peer, for running across machines
    gossip-train members --peer H:P              the member list a running peer sees
    gossip-train eval MODEL --dataset mnist ...  accuracy of a final model or checkpoint
    gossip-train chaos SCENARIO --run-dir DIR    inject faults into running peers

Errors a user can fix (a bad path, a port in use, nobody to join) print one line and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import chaos

log = logging.getLogger("gossip_train")

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


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
        help="data set (default: the small MNIST subset shipped in the package)",
    )
    g.add_argument("--data-dir", help="folder with the IDX files for mnist / fashion-mnist")
    g.add_argument("--model", choices=("mlp", "cnn"), help="model (default mlp: 784-128-10)")
    g.add_argument("--partition", help="iid (default) or dirichlet:ALPHA for non-iid shards")
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
        help="DataLoader worker processes fetching batches (default 0: the training thread)",
    )
    g.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--seed", type=int, help="base seed (default 0)")
    g.add_argument(
        "--threads", type=int, help="torch threads per peer (default max(1, cores // local peers))"
    )
    g.add_argument("--period", type=int, help="local steps between exchanges (default 20)")
    g.add_argument(
        "--gossip-budget",
        type=float,
        metavar="SHARE",
        help="CPU gossip may use while training, in cores (default 0.1; 0: no limit)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        metavar="STEPS",
        help="evaluate the task's metrics every STEPS steps as 'eval' events (default: at the end)",
    )


def add_net_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--cluster", help="swarm name; peers of other clusters are refused")
    g.add_argument(
        "--profile",
        choices=("local", "lan", "wan", "test"),
        help="membership timing profile (default local)",
    )


def add_checkpoint_args(p: argparse.ArgumentParser, *dir_flag: str) -> None:
    g = p.add_argument_group("checkpoints")
    for flag in dir_flag:
        g.add_argument(flag, help="folder for checkpoints; resumes from its newest good one")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="checkpoint every this many steps (default 500)",
    )
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        metavar="SECONDS",
        help="... or every this many seconds, whichever comes first (default 30)",
    )
    g.add_argument(
        "--checkpoint-keep", type=int, metavar="K", help="checkpoint files kept (default 3)"
    )


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """Flags of the launchers, `local` and `run`."""
    p.add_argument("--peers", type=int, default=4, help="number of peers (default 4)")
    p.add_argument("--run-dir", help="where results go (default runs/<date-time>)")
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
        help="seconds a finished peer keeps answering exchanges (default 2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress view")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="stop the run after this many seconds (default 3600)",
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
        "--restart-delay", type=float, default=1.0, help="seconds before a restart (default 1)"
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        metavar="N",
        help="with --restart-failed, give up on a peer after N restarts (default 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gossip-train",
        description="Train one PyTorch model on many peers by gossip averaging; no server.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("local", help="run N peers on this machine (one process each)")
    add_launcher_args(p)
    p.add_argument(
        "--no-zygote",
        action="store_true",
        help="start each peer as a fresh process instead of forking a pre-loaded one",
    )
    add_train_args(p)
    add_net_args(p)
    add_checkpoint_args(p)
    chaos.add_local_args(p)

    p = sub.add_parser(
        "run",
        help="run N copies of your own training script (like torchrun), each a peer",
        description="Start N processes of SCRIPT, each with RANK, WORLD_SIZE, LOCAL_RANK, "
        "LOCAL_WORLD_SIZE and the GOSSIP_TRAIN_* variables that GossipOptimizer reads.",
    )
    add_launcher_args(p)
    p.add_argument(
        "--threads", type=int, help="torch threads per copy (default max(1, cores // peers))"
    )
    p.add_argument("--period", type=int, help="local steps between exchanges (default 20)")
    add_net_args(p)
    add_checkpoint_args(p)
    chaos.add_local_args(p)
    p.add_argument("script", metavar="SCRIPT", help="the training script (a .py file)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    p = sub.add_parser("peer", help="run one peer (one per machine, or by hand)")
    p.add_argument("--config", help="TOML file with peer settings (flags override it)")
    p.add_argument("--listen", help="HOST:PORT to bind (default 127.0.0.1:0)")
    p.add_argument("--advertise", help="HOST:PORT other peers dial (default: the listen address)")
    p.add_argument("--join", help="comma-separated HOST:PORT of known peers; first answer wins")
    p.add_argument("--join-timeout", type=float, help="seconds to keep trying --join (default 10)")
    p.add_argument("--name", help="unique peer name (default: the advertised address)")
    p.add_argument("--index", type=int, help="this peer's partition index (default 0)")
    p.add_argument("--num-peers", type=int, help="number of partitions (default 1)")
    p.add_argument("--run-dir", help="folder for this peer's results (default runs/peer)")
    p.add_argument(
        "--linger",
        type=float,
        help="after training, keep averaging at least this long and while others still train",
    )
    p.add_argument(
        "--linger-quiet",
        type=float,
        metavar="SECONDS",
        help="a finished peer leaves once no training peer has offered an exchange for this "
        "long (default 2)",
    )
    p.add_argument(
        "--allow-control",
        action="store_true",
        help="accept fault-injection commands (slowdown) from `gossip-train chaos`",
    )
    p.add_argument(
        "--events",
        choices=("none", "jsonl"),
        default="none",
        help="jsonl: write machine-readable events to stdout",
    )
    add_train_args(p)
    add_net_args(p)
    add_checkpoint_args(p, "--checkpoint-dir")

    p = sub.add_parser("members", help="print the member list a running peer sees")
    p.add_argument("--peer", required=True, help="HOST:PORT of a running peer")
    p.add_argument("--cluster", default="gossip-train", help="swarm name")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("eval", help="a task's metrics of a final model or checkpoint")
    p.add_argument("model_path", metavar="MODEL_OR_CHECKPOINT")
    add_task_arg(p)
    p.add_argument("--dataset", choices=("default", "mnist", "fashion-mnist"), default=None)
    p.add_argument("--data-dir")
    p.add_argument("--model", choices=("mlp", "cnn"), default=None)

    chaos.add_chaos_parser(sub)
    return parser


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


def peer_config(args: argparse.Namespace) -> Any:
    from .config import PeerConfig, load_toml

    cfg = load_toml(args.config) if getattr(args, "config", None) else PeerConfig()
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
    ):
        if getattr(args, key, None) is not None:
            top[key] = getattr(args, key)
    if getattr(args, "allow_control", False):
        top["allow_control"] = True
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
    gossip = cfg.gossip
    if getattr(args, "period", None) is not None:
        gossip = dataclasses.replace(gossip, period_steps=args.period)
    if getattr(args, "gossip_budget", None) is not None:
        gossip = dataclasses.replace(gossip, time_budget=args.gossip_budget)
    if getattr(args, "linger_quiet", None) is not None:
        gossip = dataclasses.replace(gossip, linger_quiet=args.linger_quiet)
    return dataclasses.replace(cfg, train=train, gossip=gossip, **top)


def validate(cfg: Any) -> None:
    from p2p.transport import parse_addr

    from .partition import parse_scheme

    for addr in (cfg.listen, cfg.advertise, *cfg.join):
        if addr is not None:
            parse_addr(addr)
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
    if cfg.gossip.period_steps < 1:
        raise UserError("--period must be at least 1")
    if not 0 <= cfg.gossip.time_budget <= 64:
        raise UserError("--gossip-budget must be between 0 and 64 (cores)")
    if cfg.gossip.linger_quiet < 0:
        raise UserError("--linger-quiet must not be negative")


def cmd_peer(args: argparse.Namespace) -> int:
    import torch

    from p2p.framing import Limits
    from p2p.transport import TcpTransport

    from .config import default_threads
    from .loop import Trainer
    from .peer import Peer, jsonl_reporter

    cfg = peer_config(args)
    validate(cfg)
    torch.set_num_threads(cfg.train.threads or default_threads(1))
    trainer = Trainer(cfg.train, cfg.index, cfg.num_peers)
    if args.events != "jsonl":
        print(f"task {trainer.task.name}: {trainer.total_steps} steps", file=sys.stderr)
    report = jsonl_reporter() if args.events == "jsonl" else None
    # No frame may be larger than a model's weights plus headroom: a garbage length from a
    # neighbour can then never make this peer allocate more than that.
    limits = Limits(max_payload=max(64 << 20, 2 * trainer.weights.nbytes))
    peer = Peer(cfg, trainer, TcpTransport(limits), report)
    result = run_async(peer.run())
    if args.events != "jsonl":
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (result["metrics"] or {}).items())
        print(
            f"{result['name']}: {result['steps']} steps, {result['exchanges']} exchanges, "
            f"{shown or 'no evaluation set'}; final model {result['final_model']}"
        )
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from .status import fetch_status, format_members

    status = run_async(fetch_status(args.peer, args.cluster))
    if args.json:
        import json

        print(json.dumps(status, indent=2))
    else:
        print(format_members(status))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from .local import run_local

    return run_local(args)


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .local import run_local

    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"script {script}: no such file")
    args.script = [str(script.resolve()), *args.script_args]
    return run_local(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file

    metrics, meta = evaluate_file(
        args.model_path, args.task, args.dataset, args.data_dir, args.model
    )
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{args.model_path}: {shown} (task {meta['task']}, {meta['eval_samples']} samples)")
    return 0


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose + (1 if args.command == "peer" else 0))
    handlers = {
        "peer": cmd_peer,
        "local": cmd_local,
        "run": cmd_run,
        "members": cmd_members,
        "eval": cmd_eval,
        "chaos": chaos.run_chaos,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors become one line
        if not is_user_error(exc) or args.verbose >= 2:
            raise  # a bug, or -vv asked for the traceback
        print(f"gossip-train: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def is_user_error(exc: BaseException) -> bool:
    from p2p.transport import TransportError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .peer import PeerError
    from .task import TaskError
    from .weights import ModelError
    from .zygote import ZygoteError

    return isinstance(
        exc,
        (
            ZygoteError,
            UserError,
            TaskError,
            ModelError,
            DataError,
            PeerError,
            ConfigError,
            CheckpointError,
            TransportError,
            ValueError,
            OSError,
        ),
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
