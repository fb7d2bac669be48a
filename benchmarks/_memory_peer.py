"""One peer of ``memory.py``: run as `gossip-train peer` does, reporting RSS at each stage.

``python benchmarks/_memory_peer.py SPEC_JSON`` (index, join, epochs, period, run_dir and
hidden: the hidden width of an MLP 784-H-10 swapped in for the seed model, 0 to keep it)
builds trainer.loop.Trainer and runs trainer.peer.Peer over TcpTransport, printing
``LISTENING <addr>`` once it listens and ``RESULT <json>`` at the end: its RSS, anonymous
and file-backed memory and peak at each stage (imports, data, model, each event kind),
through training, and the model's and data set's sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import print_result


def mem() -> dict[str, int]:
    """This process's RSS, its anonymous and file-backed parts, and its peak, in bytes."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "hwm"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in keys:
            out[keys[key]] = int(line.split()[1]) * 1024
    return out


def main(spec_json: str) -> None:
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
    print_result(
        {
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
    )


if __name__ == "__main__":
    main(sys.argv[1])
