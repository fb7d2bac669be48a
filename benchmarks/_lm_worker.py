"""One worker of the transformer benchmark (``transformer.py``) on the built-in shakespeare task.

The model, data, loss, optimizer and metric are ``trainer.tasks.shakespeare``'s (nanoGPT's
CPU GPT, 0.80M parameters; AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices;
``val_loss`` over the 480 fixed validation windows), batches come from ``trainer.data.Batches``
(seed 0, this rank as the peer index) and evaluation from ``eval_batches`` with the batch size
of our own loop (256), in eval mode under ``inference_mode``, as ``gossip-train`` does. The
model is built after ``torch.manual_seed(0)``, so every worker starts from the same weights
(the same ones as a ``gossip-train`` peer with seed 0). Gradients are clipped at
``--clip-grad`` (1.0), as ``--clip-grad 1.0`` does for the gossip peers.

Two jobs:

- ``tta`` (time to a validation loss): one plain process (``--world 1``, any ``--threads``)
  or one rank of torch DDP over gloo (``--world N``, rank r training on ``sk.data(r, N)``'s
  shard). Every ``--eval-every`` steps (and at ``--max-steps``) rank 0 evaluates: the ranks
  of DDP hold the same weights, so its loss is every worker's; the others wait for it at
  the next collective, as they would in a DDP job that evaluates on rank 0. Rank 0 then
  broadcasts whether to stop (target reached or budget spent). Times are seconds since
  ``--launch`` (the launcher's time.time() before it started any process), so interpreter
  start, the torch import and the rendezvous are included;
- ``ownloop`` (GossipOptimizer overhead): the user's own loop, plain or with the inner
  optimizer wrapped in ``GossipOptimizer`` (``--gossip``; ``--peers 1``: no neighbour, the
  wrapper's own cost; ``--peers 2 --join ADDR``: gossiping). After set-up the worker prints
  ``READY <addr>`` and waits for a line on stdin, so the launcher can start the timed
  sections of concurrent workers together; then ``--warmup`` untimed and ``--steps``
  timed steps, each step's end time recorded.

Each worker prints ``RESULT <json>`` on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from common import add_max_seconds, print_result
from torch import nn

import trainer.tasks.shakespeare as sk
from trainer.data import Batches, eval_batches

EVAL_BATCH = 256  # TrainConfig.eval_batch_size: what a gossip-train peer evaluates with


def build(rank: int, world: int, seed: int, batch: int) -> tuple[nn.Module, Batches, Any]:
    """The model (seeded), this rank's endless batches and the shared evaluation set."""
    train, evaluation = sk.data(rank, world, seed=seed)
    batches = Batches(train, batch, seed, rank)
    torch.manual_seed(seed)
    model = sk.model()
    return model, batches, evaluation


def evaluate(model: nn.Module, evaluation: Any) -> float:
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return float(sk.metrics(model, eval_batches(evaluation, EVAL_BATCH))["val_loss"])
    finally:
        model.train(was)


# -- time to a validation loss -------------------------------------------------------------------
def tta(args: argparse.Namespace) -> dict[str, Any]:
    ddp = args.world > 1
    if ddp:
        dist.init_process_group(
            "gloo",
            init_method=args.init,
            rank=args.rank,
            world_size=args.world,
            timeout=datetime.timedelta(seconds=600),
        )
    model, batches, evaluation = build(args.rank, args.world, args.seed, args.batch)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp else model
    params = list(model.parameters())
    opt = sk.optimizer(net.parameters(), lr=args.lr)
    since = lambda: time.time() - args.launch  # noqa: E731
    ready_s = since()
    curve: list[list[float]] = []  # [step, seconds since launch, val_loss]
    reached: list[float] | None = None
    eval_s = 0.0
    first_step_s: float | None = None
    step = 0
    net.train()
    while True:
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = sk.loss(net, batch)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        step += 1
        if first_step_s is None:
            first_step_s = since()
        at_eval = step % args.eval_every == 0 or step >= args.max_steps
        if not at_eval and args.max_seconds <= 0:
            continue  # with a time budget, rank 0 says at every step whether to stop
        stop = torch.zeros(1)
        if args.rank == 0:
            spent = 0 < args.max_seconds <= since()
            if at_eval or spent:
                t0 = time.perf_counter()
                val = evaluate(model, evaluation)
                eval_s += time.perf_counter() - t0
                curve.append([step, round(since(), 3), val])
                if reached is None and val <= args.target:
                    reached = curve[-1]
            if reached is not None or step >= args.max_steps or spent:
                stop[0] = 1.0
        if ddp:
            dist.broadcast(stop, src=0)
        if stop[0] > 0:
            break
    end_s = since()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return {
        "rank": args.rank,
        "world": args.world,
        "threads": torch.get_num_threads(),
        "steps": step,
        "ready_s": ready_s,  # model, data and (DDP) rendezvous done
        "first_step_s": first_step_s,
        "end_s": end_s,
        "closed_s": since(),
        "eval_s": eval_s,
        "reached": reached,  # [step, seconds since launch, val_loss] or None
        "curve": curve,
    }


# -- own loop, plain or wrapped ------------------------------------------------------------------
def ownloop(args: argparse.Namespace) -> dict[str, Any]:
    model, batches, _ = build(args.index, args.peers, args.seed, args.batch)
    params = list(model.parameters())
    inner = sk.optimizer(params, lr=args.lr)
    opt: Any = inner
    addr = "-"
    run_dir = None
    if args.gossip:
        from trainer import GossipOptimizer

        run_dir = args.run_dir or tempfile.mkdtemp(prefix="lm-ownloop-")
        opt = GossipOptimizer(
            model,
            inner,
            listen="127.0.0.1:0",
            join=[args.join] if args.join else None,
            index=args.index,
            num_peers=args.peers,
            run_dir=run_dir,
            period=args.period,
            linger=0,
        )
        addr = opt.peer.node.addr
    print(f"READY {addr}", flush=True)
    if not sys.stdin.readline():  # the launcher's go (EOF: it gave up on us)
        raise SystemExit("ownloop: stdin closed before the start")
    model.train()

    def one_step() -> None:
        batch = next(batches)
        loss = sk.loss(model, batch)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        opt.zero_grad()

    for _ in range(args.warmup):
        one_step()
    ends: list[float] = []
    c0, t0 = time.process_time(), time.time()
    tc0 = time.thread_time()
    for _ in range(args.steps):
        one_step()
        ends.append(time.time())
    cpu, thread_cpu = time.process_time() - c0, time.thread_time() - tc0
    out: dict[str, Any] = {
        "index": args.index,
        "gossip": args.gossip,
        "peers": args.peers,
        "steps": args.steps,
        "start": t0,  # time.time() when the timed steps began
        "ends": ends,  # time.time() at the end of each timed step
        "seconds": ends[-1] - t0,
        "cpu_s": cpu,  # the whole process: the gossip agent thread included
        "train_thread_cpu_s": thread_cpu,
    }
    if args.gossip:
        result = opt.close()
        out["exchanges"] = result.get("exchanges")
        out["bytes_sent"] = result.get("bytes_sent")
        out["gossip_cpu_seconds"] = result.get("gossip_cpu_seconds")
        out["run_dir"] = run_dir
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("tta", "ownloop"), required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    # tta
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1, help="1: a plain process, no DDP")
    parser.add_argument("--init", default="", help="init_method URL (file://...)")
    parser.add_argument("--launch", type=float, default=0.0, help="launcher's time.time()")
    parser.add_argument("--target", type=float, default=1.90, help="val_loss to reach")
    parser.add_argument("--max-steps", type=int, default=3000)
    add_max_seconds(parser)
    parser.add_argument("--eval-every", type=int, default=100, help="steps")
    # ownloop
    parser.add_argument("--gossip", action="store_true", help="wrap in GossipOptimizer")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--join", default="", help="address of a peer to join through")
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = tta(args) if args.job == "tta" else ownloop(args)
    print_result(result)


if __name__ == "__main__":
    main()
