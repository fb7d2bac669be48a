"""Peer memory: RSS of a peer that trains and gossips, against a bare ``import torch``.

RSS of a bare ``python -c "import torch"`` against pairs of peers run by
``_memory_peer.py``, which is ``gossip-train peer`` (trainer.loop.Trainer, trainer.peer.Peer,
TcpTransport) with the model optionally swapped before the peer starts, so a ~10M-parameter
MLP can be measured without a new model in trainer/. Each peer reports its RSS at every
stage (imports, data, model, each event); the bundled data set, period 5.

    .venv/bin/python benchmarks/memory.py                   # the seed MLP and 784-12500-10
    .venv/bin/python benchmarks/memory.py --quick           # smoke run: 784-2000-10
    .venv/bin/python benchmarks/memory.py --json out.json
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    REPO,
    GossipBenchConfig,
    Runs,
    fmt,
    load_now,
    markdown_table,
    measure_main,
    python_cmd,
    read_until,
    require_result,
)

log = logging.getLogger(__name__)


def bare_torch_rss(reps: int = 3) -> dict[str, Any]:
    """RSS of a fresh ``python -c "import torch"``, measured inside it after the import."""
    code = (
        "import torch, pathlib; s = pathlib.Path('/proc/self/status').read_text();"
        "print([int(l.split()[1]) * 1024 for l in s.splitlines() if l.startswith('VmRSS:')][0])"
    )
    got = [
        int(subprocess.check_output([*python_cmd(), "-c", code], text=True)) for _ in range(reps)
    ]
    return {"rss_mb": statistics.median(got) / 1e6, "each_mb": [g / 1e6 for g in got]}


def memory_pair(cfg: GossipBenchConfig, hidden: int, work: Path) -> list[dict[str, Any]]:
    """Two ``_memory_peer.py`` processes; each one's stage report.

    The first trains until it is told to stop (SIGTERM, which a peer handles by finishing
    cleanly), so it is still there, training and exchanging, however long the second takes
    to start; the second joins it and trains ``memory_epochs``.
    """
    spec = {"hidden": hidden, "period": cfg.memory_period, "run_dir": str(work)}
    procs: list[subprocess.Popen[str]] = []

    def start(index: int, epochs: float, join: str | None) -> subprocess.Popen[str]:
        s = {**spec, "index": index, "epochs": epochs, "join": join}
        argv = [*python_cmd(), str(BENCH_DIR / "_memory_peer.py"), json.dumps(s)]
        procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True))
        return procs[-1]

    try:
        first = start(0, 1000.0, None)
        second = start(1, cfg.memory_epochs, wait_listening(first, cfg.timeout))
        joined = peer_result(second, cfg.timeout)
        first.terminate()
        return [peer_result(first, cfg.timeout), joined]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_listening(proc: subprocess.Popen[str], timeout: float) -> str:
    return read_until(proc, "LISTENING ", timeout, "memory peer").split()[0]


def peer_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    return require_result(out, f"memory peer (exit {proc.returncode})")


def memory(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    bare = bare_torch_rss()
    models = {"mlp (seed, 0.10M)": 0, f"mlp 784-{cfg.big_hidden}-10": cfg.big_hidden}
    out: dict[str, Any] = {"bare_torch": bare, "models": {}}
    for name, hidden in models.items():
        log.info("memory: %s (load %.1f)", name, load_now())
        peers = memory_pair(cfg, hidden, runs.root / f"memory-{hidden or 'seed'}")
        out["models"][name] = memory_breakdown(peers, bare["rss_mb"])
    return out


def memory_breakdown(peers: list[dict[str, Any]], bare_mb: float) -> dict[str, Any]:
    """RSS of the pair against bare torch, and the first peer's growth stage by stage.

    The first peer (it never pulls a catch-up copy) gives the breakdown, in anonymous memory
    (RssAnon: heap and tensors; code pages of libraries show up in RssFile instead).
    """
    p = peers[0]
    mb = {k: {f: v / 1e6 for f, v in m.items()} for k, m in p["stages"].items()}
    anon = {k: m["anon"] for k, m in mb.items()}
    model_mb = p["model_bytes"] / 1e6
    training = max(max(q["training_rss"]) for q in peers) / 1e6
    started = anon["started"]
    stepped = anon.get("progress", started)
    exchanged = anon.get("first_exchange", stepped)
    steps = {
        "data set load": anon["data_and_seed_model"] - anon["imports"],
        "model built": anon["model"] - anon["data_and_seed_model"],
        "start (node, membership, exchanger)": started - anon["model"],
        "first step (grads, Adam state, temporaries)": stepped - started,
        "first exchange (snapshot, delta, receive buffer)": exchanged - stepped,
        "rest of training": max(p["training_anon"]) / 1e6 - exchanged,
    }
    model_part = sum(v for k, v in steps.items() if not k.startswith("data"))
    return {
        "params": p["params"],
        "model_mb": model_mb,
        "data_mb": p["data_bytes"] / 1e6,
        "stages_mb": mb,
        "anon_growth_mb": steps,
        "training_rss_mb": training,
        "peak_rss_mb": max(q["hwm"] for q in peers) / 1e6,
        "over_bare_mb": training - bare_mb,
        "over_bare_x_model": (training - bare_mb) / model_mb,
        "model_part_mb": model_part,
        "model_part_x_model": model_part / model_mb,
        "gossip_part_x_model": steps["first exchange (snapshot, delta, receive buffer)"] / model_mb,
        "steps": [q["steps"] for q in peers],
        "exchanges": [q["exchanges"] for q in peers],
        "training_rss_mb_each": [max(q["training_rss"]) / 1e6 for q in peers],
    }


def memory_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    rows = []
    for name, m in r["models"].items():
        rows.append(
            [name, f"{m['params']:,}", fmt(m["model_mb"]), fmt(m["data_mb"], ".1f"),
             fmt(m["training_rss_mb"], ".0f"), fmt(m["over_bare_mb"], ".0f"),
             fmt(m["over_bare_x_model"], ".1f"), fmt(m["model_part_x_model"], ".1f"),
             fmt(m["gossip_part_x_model"], ".1f")]
        )  # fmt: skip
    head = f"bare `python -c 'import torch'`: {r['bare_torch']['rss_mb']:.0f} MB RSS\n\n"
    growth = []
    for name, m in r["models"].items():
        growth += [[name, k, fmt(v, ".1f"), fmt(v / m["model_mb"], ".1f")]
                   for k, v in m["anon_growth_mb"].items()]  # fmt: skip
    return (
        head
        + markdown_table(
            [
                "model",
                "params",
                "model MB",
                "data MB",
                "peer RSS, training (MB)",
                "over bare (MB)",
                "over bare / model",
                "model-driven growth / model",
                "gossip buffers / model",
            ],
            rows,
        )  # fmt: skip
        + "\n\n"
        + markdown_table(["model", "anonymous memory added by", "MB", "/ model"], growth)
    )


def main() -> None:
    measure_main("memory", __doc__, memory, memory_table, uses_dataset=False, repeats=False)


if __name__ == "__main__":
    main()
