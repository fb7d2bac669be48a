"""The ``gossip-train`` command line.

    gossip-train local --peers 4                 N peers on this machine, one process each
    gossip-train peer --listen H:P --join H:P    one peer, for running across machines
    srun gossip-train peer --slurm ...           one peer per Slurm task, all from SLURM_*
    gossip-train members --peer H:P              the member list a running peer sees
    gossip-train eval MODEL --dataset mnist ...  accuracy of a final model or checkpoint
    gossip-train chaos SCENARIO --run-dir DIR    inject faults into running peers
    gossip-train summary RUN_DIR                 rebuild a run's summary from its files
    gossip-train report RUN_DIR                  RUN_DIR/report.html: the run's plots

Errors a user can fix (a bad path, a port in use, nobody to join) print one line and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .chaos import driver as chaos
from .config import PeerConfig
from .flags import (
    add_checkpoint_args,
    add_launcher_args,
    add_monitor_args,
    add_net_args,
    add_secret_arg,
    add_slurm_args,
    add_task_arg,
    add_train_args,
    index_arg,
    peer_config,
    slurm_wanted,
    validate,
)
from .runtime import EXIT_USAGE, UserError, first_line, is_user_error, run_async, setup_logging

log = logging.getLogger("gossip_train")


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
    add_monitor_args(p, launcher=True)
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
    add_monitor_args(p, launcher=True)
    chaos.add_local_args(p)
    p.add_argument("script", metavar="SCRIPT", help="the training script (a .py file)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    p = sub.add_parser("peer", help="run one peer (one per machine, or by hand)")
    p.add_argument(
        "--config",
        help="TOML (or a launcher's JSON) file with peer settings; flags override it",
    )
    p.add_argument("--listen", help="HOST:PORT to bind (default 127.0.0.1:0)")
    p.add_argument("--advertise", help="HOST:PORT other peers dial (default: the listen address)")
    p.add_argument(
        "--join",
        help="comma-separated HOST:PORT of known peers, first answer wins; dns:NAME:PORT "
        "stands for every address NAME resolves to (resolved again while no peer is alive)",
    )
    p.add_argument("--join-timeout", type=float, help="seconds to keep trying --join (default 10)")
    p.add_argument(
        "--wait-peers",
        type=int,
        metavar="N",
        help="before training, wait up to --join-timeout until N peers (this one included) "
        "have joined (default: start at once)",
    )
    p.add_argument("--name", help="unique peer name (default: the advertised address)")
    p.add_argument(
        "--index",
        type=index_arg,
        help="this peer's partition index (default 0); auto: the ordinal N of a StatefulSet "
        "pod's hostname NAME-N",
    )
    p.add_argument("--num-peers", type=int, help="number of partitions (default 1)")
    p.add_argument("--run-dir", help="folder for this peer's results (default runs/peer)")
    p.add_argument(
        "--linger",
        type=float,
        help="after training, keep averaging while some live peer still trains, at most this "
        f"many seconds (default {PeerConfig().linger_seconds:g}: leave at once)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without a secret: anyone who can reach the "
        "port can join and change the weights",
    )
    p.add_argument(
        "--allow-control",
        action="store_true",
        help="accept fault-injection commands (slow-peer, poison) from `gossip-train chaos`",
    )
    p.add_argument(
        "--events",
        choices=("none", "jsonl"),
        default="none",
        help="jsonl: also write the events (always in RUN_DIR/events.jsonl) to stdout",
    )
    p.add_argument(
        "--events-fd",
        type=int,
        metavar="FD",
        help="also write the events to this open file descriptor, best effort (launchers)",
    )
    add_train_args(p)
    add_net_args(p)
    add_checkpoint_args(p, "--checkpoint-dir")
    add_monitor_args(p)
    add_slurm_args(p)

    p = sub.add_parser("members", help="print the member list a running peer sees")
    p.add_argument("--peer", required=True, help="HOST:PORT of a running peer")
    p.add_argument("--cluster", default="gossip-train", help="swarm name")
    add_secret_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "secret",
        help="print a new random secret (a line of a keyring file)",
        description="Print a new random secret: `gossip-train secret > swarm.key`, copy the "
        "file to every peer, give it as --secret-file. To rotate, add a new secret as a "
        "second line everywhere, then make it the first line, then remove the old one.",
    )

    p = sub.add_parser(
        "summary",
        help="rebuild RUN_DIR/summary.json and the consensus model from the run's files",
        description="Rebuild a local run's summary.json, progress.jsonl and consensus model "
        "from its peers' events files (after a launcher crash, say) and print its table.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--no-consensus", action="store_true", help="do not average and evaluate final models"
    )

    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report.html: the run's plots and tables on one page",
        description="Draw a run's metrics, losses, disagreement, traffic, refused updates and "
        "membership timeline from its files (peer-*/events.jsonl, launcher.jsonl, "
        "summary.json, report.json) into one self-contained HTML page. Needs matplotlib: "
        "pip install 'gossip-train[report]'.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="where to write the page (default RUN_DIR/report.html)")

    p = sub.add_parser("eval", help="a task's metrics of a final model or checkpoint")
    p.add_argument("model_path", metavar="MODEL_OR_CHECKPOINT")
    add_task_arg(p)
    p.add_argument("--dataset", choices=("default", "mnist", "fashion-mnist"), default=None)
    p.add_argument("--data-dir")
    p.add_argument("--model", choices=("mlp", "cnn"), default=None)

    chaos.add_chaos_parser(sub)
    return parser


def cmd_peer(args: argparse.Namespace) -> int:
    from .peer import run_peer

    cfg = peer_config(args)
    validate(cfg)
    if slurm_wanted(args.slurm, os.environ):
        from pathlib import Path

        from .config import save_config

        # What a launcher would have written: this task's settings, next to its events, for
        # `gossip-train summary JOB_DIR` and for whoever looks at the job folder later.
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.json")
    fd = args.events_fd if args.events_fd is not None else (1 if args.events == "jsonl" else None)
    result = run_peer(cfg, fd, quiet=args.events == "jsonl")
    if args.events != "jsonl":
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (result["metrics"] or {}).items())
        print(
            f"{result['name']}: {result['steps']} steps, {result['exchanges']} exchanges, "
            f"{shown or 'no evaluation set'}; final model {result['final_model']}"
        )
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from p2p.secure import Keyring

    from .status import fetch_status, format_members

    keyring = Keyring.from_file(args.secret_file) if args.secret_file else None
    status = run_async(fetch_status(args.peer, args.cluster, keyring=keyring))
    if args.json:
        import json

        print(json.dumps(status, indent=2))
    else:
        print(format_members(status))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from .launch.local import run_local

    return run_local(args)


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .launch.local import run_local

    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"script {script}: no such file")
    args.script = [str(script.resolve()), *args.script_args]
    return run_local(args)


def cmd_secret(args: argparse.Namespace) -> int:
    from p2p.secure import new_secret

    print(new_secret())
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .launch import summary
    from .launch.local import print_table

    built = summary.write(args.run_dir, consensus=not args.no_consensus)
    print_table(built, Path(args.run_dir))
    failed = [p for p in built["peers"] if p["status"] not in ("finished", "killed", "running")]
    for p in failed:
        print(f"gossip-train: {p['name']} {p['status']}: {p.get('error') or '?'}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_html

    print(f"report: {write_html(args.run_dir, args.output)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file

    metrics, meta = evaluate_file(
        args.model_path, args.task, args.dataset, args.data_dir, args.model
    )
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{args.model_path}: {shown} (task {meta['task']}, {meta['eval_samples']} samples)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose + (1 if args.command == "peer" else 0))
    handlers = {
        "peer": cmd_peer,
        "local": cmd_local,
        "run": cmd_run,
        "members": cmd_members,
        "eval": cmd_eval,
        "summary": cmd_summary,
        "report": cmd_report,
        "secret": cmd_secret,
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
