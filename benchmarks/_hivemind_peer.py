"""One hivemind peer of ``tta.py``: the seed MLP on its shard under hivemind.Optimizer.

Run by an interpreter that can import hivemind (``--hivemind-python``; hivemind is kept out
of the project's venv) as ``python benchmarks/_hivemind_peer.py SPEC_JSON``. Peer 0 prints
``MADDRS <json>`` (its DHT addresses, for the others to join through); every peer prints
``EVAL <json>`` (step, seconds since the spec's launch time, test accuracy, hivemind epoch)
every ``eval_every`` of its steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    sys.path.insert(0, str(REPO))  # hivemind lives in another venv; the project is here
    import hivemind
    import torch

    from trainer.data import BatchIterator, load_dataset
    from trainer.models import build_model, evaluate
    from trainer.partition import partition

    torch.set_num_threads(1)
    n, index = spec["peers"], spec["index"]
    data = load_dataset(
        spec["dataset"], Path(spec["data_dir"]) if spec["dataset"] != "default" else None
    )
    shard = partition(data.y_train.numpy(), n, index, "iid", 0, min_samples=32)
    batches = BatchIterator(data.x_train, data.y_train, shard, 32, 0, index)
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    dht = hivemind.DHT(initial_peers=spec.get("initial_peers", []),
                       host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # fmt: skip
    if index == 0:
        print("MADDRS " + json.dumps([str(a) for a in dht.get_visible_maddrs()]), flush=True)
    opt = hivemind.Optimizer(
        dht=dht, run_id=spec["run_id"], batch_size_per_step=32,
        target_batch_size=spec["target_batch_size"], params=model.parameters(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), use_local_updates=True,
        matchmaking_time=spec["matchmaking_time"], averaging_timeout=10.0, verbose=False,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.time() - spec["launch"]
    for step in range(1, spec["max_steps"] + 1):
        x, y = next(batches)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if step % spec["eval_every"] == 0:
            acc = evaluate(model, data.x_test, data.y_test)
            ev = {"step": step, "t": time.time() - spec["launch"], "accuracy": acc,
                  "hivemind_epoch": opt.local_epoch, "started_s": started}  # fmt: skip
            print("EVAL " + json.dumps(ev), flush=True)
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
