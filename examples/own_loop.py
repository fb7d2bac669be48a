"""Your own training loop, gossiping: AdamW, a cosine LR schedule, gradient clipping.

    gossip-train run --peers 4 examples/own_loop.py --data-dir ../shared/data/mnist
    gossip-train run --peers 4 --restart-failed examples/own_loop.py   # bundled subset

Plain PyTorch. The only gossip-train lines are the ``GossipOptimizer`` around the optimizer
and ``opt.close()``. Under ``gossip-train run`` every copy reads RANK and WORLD_SIZE (as
under torchrun) to take its own shard; GossipOptimizer reads where to listen, whom to join
and where to checkpoint from the GOSSIP_TRAIN_* variables ``run`` sets. Restarted after a
crash, the copy resumes at the step of its last checkpoint, with the same shard position.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from trainer import GossipOptimizer
from trainer.data import load_dataset
from trainer.partition import partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="MNIST IDX files (default: the bundled subset)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    data = load_dataset("mnist" if args.data_dir else "default", args.data_dir)
    shard = torch.as_tensor(partition(data.y_train.numpy(), world, rank, "iid", seed=0))
    steps_per_epoch = len(shard) // args.batch_size
    total = int(args.epochs * steps_per_epoch)

    def evaluate(net: nn.Module) -> dict[str, float]:  # called on the final weights
        net.eval()
        with torch.inference_mode():
            out = net(data.x_test)
        net.train()
        return {
            "accuracy": (out.argmax(1) == data.y_test).float().mean().item(),
            "loss": F.cross_entropy(out, data.y_test).item(),
        }

    torch.manual_seed(0)  # the same initial weights on every peer
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=total)
    opt = GossipOptimizer(model, inner, scheduler=schedule, state={"seen": 0}, evaluate=evaluate)
    if opt.resumed_step:
        print(f"resumed at step {opt.resumed_step} (seen {opt.state['seen']} samples)")

    def epoch_order(epoch: int) -> torch.Tensor:  # from (epoch, rank) alone: resumable
        gen = torch.Generator().manual_seed(1000 * epoch + rank)
        return shard[torch.randperm(len(shard), generator=gen)]

    order = epoch_order(opt.resumed_step // steps_per_epoch)
    for step in range(opt.resumed_step, total):
        at = (step % steps_per_epoch) * args.batch_size
        if at == 0:
            order = epoch_order(step // steps_per_epoch)
        idx = order[at : at + args.batch_size]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        schedule.step()
        opt.state["seen"] += len(idx)
        if step % 50 == 0:
            opt.report(loss=loss.item())

    opt.report(samples=opt.state["seen"])
    result = opt.close()  # lingers, saves final.pt, evaluates it, leaves
    print(
        f"peer {rank}: {result['steps']} steps, {result['exchanges']} exchanges, "
        f"accuracy {result['metrics']['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
