"""Start-up, gossip-train side: launch of 8 local peers to the first completed exchange.

``gossip-train local --peers 8 --epochs 1 --linger 5`` (``common.launch_local``: peers forked
from the pre-loaded zygote, real TCP on 127.0.0.1, one torch thread per peer); seconds from
the moment this script starts the launcher to its events in RUN_DIR/summary.json: the
launcher's clock zero (when it creates the run dir, noted by a watcher thread), the zygote
ready, peers forked, listening, training, the first completed exchange (any peer's
``first_exchange``) and every peer's first. Plus a probe (``_fork_probe.py``): a parent
pre-loaded like trainer/launch/zygote.py forks one peer, with and without building an
optimizer first (the first one imports torch._dynamo).

    .venv/bin/python benchmarks/startup.py                  # 3 reps, MNIST
    .venv/bin/python benchmarks/startup.py --quick          # smoke run, bundled data set, 4 peers
    .venv/bin/python benchmarks/startup.py --reps 5 --json out.json
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from common import (
    BENCH_DIR,
    REPO,
    GossipBenchConfig,
    Runs,
    common_args,
    fmt,
    launch_local,
    load_now,
    markdown_table,
    measure_main,
    median,
    python_cmd,
    read_result,
)

log = logging.getLogger(__name__)


def startup_run(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    n = cfg.startup_peers
    args = [*common_args(cfg, n, cfg.startup_epochs), "--linger", str(cfg.startup_linger)]
    load = load_now()
    run = launch_local(runs.next(f"startup-x{n}"), args, cfg.timeout)

    def first(kind: str) -> float | None:
        ts = [e["t"] for e in run.events(kind)]
        return run.since_launch(min(ts)) if ts else None

    def last(kind: str) -> float | None:
        ts = [e["t"] for e in run.events(kind)]
        return run.since_launch(max(ts)) if len(ts) >= n else None

    return {
        "launcher_ready_s": run.offset,  # the launcher's imports, up to its clock zero
        "zygote_ready_s": first("network"),  # data set loaded in the zygote
        "first_spawned_s": first("spawned"),
        "all_spawned_s": last("spawned"),
        "all_listening_s": last("listening"),
        "all_started_s": last("started"),
        "first_exchange_s": first("first_exchange"),
        "every_peer_exchanged_s": last("first_exchange"),
        "load_1m": [load, load_now()],
        "run_dir": str(run.run_dir),
    }


def startup(cfg: GossipBenchConfig, runs: Runs) -> dict[str, Any]:
    results = []
    probes: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    for rep in range(cfg.reps):
        log.info("start-up rep %d/%d (load %.1f)", rep + 1, cfg.reps, load_now())
        results.append(startup_run(cfg, runs))
        for kind in probes:
            probes[kind].append(fork_probe(cfg, runs, warm=kind == "warm"))
    keys = [k for k in results[0] if k.endswith("_s")]
    return {
        "peers": cfg.startup_peers,
        "median": {k: median([r[k] for r in results]) for k in keys},
        "runs": results,
        "fork_probe": {
            kind: {k: median([r[k] for r in rs]) for k in rs[0] if k.endswith("_s")}
            for kind, rs in probes.items()
        },
        "fork_probe_runs": probes,
    }


def fork_probe(cfg: GossipBenchConfig, runs: Runs, warm: bool) -> dict[str, Any]:
    """A parent pre-loaded as the zygote is forks one peer: seconds to its events.

    ``warm`` also builds one throwaway Adam optimizer in the parent before forking. The
    first optimizer a process builds imports torch._dynamo (torch.optim wraps its methods
    with torch._compile's disable decorator); the zygote does not, so each peer does.
    """
    spec = {"dataset": cfg.dataset, "data_dir": cfg.data if cfg.dataset != "default" else None,
            "warm": warm, "run_dir": str(runs.next("fork-probe"))}  # fmt: skip
    argv = [*python_cmd(), str(BENCH_DIR / "_fork_probe.py"), json.dumps(spec)]
    load = load_now()
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=cfg.timeout)
    result = read_result(out.stdout)
    if result is not None:
        return {**result, "load_1m": load}
    raise RuntimeError(f"fork probe exited with {out.returncode}: {out.stderr[-300:]}")


def startup_table(r: dict[str, Any], cfg: GossipBenchConfig) -> str:
    rows = [[k.removesuffix("_s").replace("_", " "), fmt(v)] for k, v in r["median"].items()]
    probe = [
        [kind, fmt(m["listening_s"]), fmt(m["started_s"]), fmt(m["child_cpu_s"])]
        for kind, m in r["fork_probe"].items()
    ]
    return (
        markdown_table([f"{r['peers']} peers: seconds since launch", "median"], rows)
        + "\n\n"
        + markdown_table(
            [
                "one forked peer, parent torch._dynamo",
                "fork to listening (s)",
                "to started (s)",
                "child CPU (s)",
            ],
            probe,
        )  # fmt: skip
    )


def main() -> None:
    measure_main("startup", __doc__, startup, startup_table)


if __name__ == "__main__":
    main()
