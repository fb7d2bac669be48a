"""Gossip's own memory per peer, against the model's float32 size, for each compression.

Two exchangers over real TCP in one process, a 10M-parameter vector (40 MB), robust mixing
on and off. tracemalloc (which sees numpy's buffers) measures what the exchanger keeps
between exchanges (snapshot, compressed payload, error feedback residual, robust mixing's
anchor, the transport's pooled receive buffer) and the peak of one exchange above that.

    .venv/bin/python benchmarks/gossip_buffers.py [--params 10000000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tracemalloc

import numpy as np

from gossip.exchange import Exchanger, GossipConfig
from gossip.screening import RobustMixing
from gossip.store import ArrayStore
from p2p.framing import Limits
from p2p.node import Node, NodeConfig
from p2p.transport import TcpTransport


async def measure(n: int, compress: str, robust: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    a_w = rng.normal(size=n).astype(np.float32)
    b_w = a_w + 0.01 * rng.normal(size=n).astype(np.float32)
    limits = Limits(max_payload=2 * 4 * n)
    stores = [ArrayStore(a_w), ArrayStore(b_w)]
    del a_w, b_w
    config = GossipConfig(
        compress=compress, robust=RobustMixing(enabled=robust), deadline_min_rate=1e6
    )
    nodes = [Node(TcpTransport(limits), f"p{i}", NodeConfig()) for i in range(2)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ex = [Exchanger(node, store, config) for node, store in zip(nodes, stores, strict=True)]
    built = tracemalloc.get_traced_memory()[0] - base
    for _ in range(2):  # warm: the transport's pooled receive buffers now exist
        out = await ex[0].exchange(nodes[1].addr)
        assert out.ok, out.reason
    kept = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.reset_peak()
    out = await ex[0].exchange(nodes[1].addr)
    assert out.ok, out.reason
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    for e in ex:
        e.close()
    for node in nodes:
        await node.close()
    model = 4 * n
    # Two peers in this process: per peer is half of what both hold.
    return {
        "compress": compress,
        "robust": robust,
        "model_mb": model / 1e6,
        "built_per_peer_x": round(built / 2 / model, 3),
        "kept_per_peer_x": round(kept / 2 / model, 3),
        "peak_per_peer_x": round(peak / 2 / model, 3),
        "wire_mb": ex[0].wire_nbytes / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for compress in ("none", "fp16", "bf16", "int8"):
        for robust in (True, False):
            row = asyncio.run(measure(args.params, compress, robust))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": args.params, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
