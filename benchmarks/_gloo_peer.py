"""One rank of the gloo all_reduce reference in the exchange benchmark.

Each rank all_reduces a float32 tensor of ``--size`` values over gloo on loopback. Rank 0
times every call (after ``--warmup`` untimed ones) and prints ``RESULT <json>``.

    GLOO_SOCKET_IFNAME=lo python benchmarks/_gloo_peer.py --rank 0 --world 2 \
        --size 1000000 --init file:///tmp/x
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist
from common import print_result


def run(args: argparse.Namespace) -> list[float]:
    dist.init_process_group(
        "gloo",
        init_method=args.init,
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=120),
    )
    # Zeros keep the values finite however often they are summed; the work is the same.
    tensor = torch.zeros(args.size, dtype=torch.float32)
    times: list[float] = []
    try:
        for i in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--size", type=int, required=True, help="float32 values")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--init", required=True, help="init_method URL (file://...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = run(args)
    if args.rank == 0:
        print_result({"seconds": times})


if __name__ == "__main__":
    main()
