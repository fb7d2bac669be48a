"""A run's summary, built from its files alone.

Everything a run knows is on disk as it happens: ``run.json`` (the launcher's settings, written
at the start), ``peer-<i>/config.json`` (each peer's complete settings), ``peer-<i>/events.jsonl``
(each peer's own events, appended as they happen), ``launcher.jsonl`` (starts, exits, restarts,
faults) and ``chaos-events.jsonl`` (faults a separate ``gossip-train chaos`` injected). So the
launcher's summary and ``gossip-train summary RUN_DIR`` (after a launcher crash, say) are the
same function of the same files: ``summary.json``, ``progress.jsonl`` and the consensus model.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gossip.events import read_events

from ..config import ConfigError, TrainConfig, load_config
from .zygote import pid_alive

RUN_FILE = "run.json"
LAUNCHER_EVENTS = "launcher.jsonl"
CHAOS_EVENTS = "chaos-events.jsonl"
# Peer events that summary.json lists (progress lines go to progress.jsonl instead).
SKIP_IN_EVENTS = {"progress"}


class SummaryError(ValueError):
    """The folder is not a run (no run.json), or its files cannot be read."""


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def peer_record(
    name: str, addr: str, events: list[dict[str, Any]], launcher: list[dict[str, Any]]
) -> dict[str, Any]:
    """What one peer did, from its events and the launcher's notes about it."""
    mine = [e for e in launcher if e.get("peer") == name]
    spawns = [e for e in mine if e.get("kind") == "spawned"]
    # This life: the events since the peer last started listening.
    starts = [i for i, e in enumerate(events) if e.get("kind") == "listening"]
    life = events[starts[-1] :] if starts else events
    reports = [e for e in life if e.get("kind") in ("progress", "error")]

    def latest(key: str, rename: str | None = None) -> Any:
        """The newest value this life reported for ``key`` (progress or error events)."""
        for e in reversed(reports):
            if e.get(rename or key) is not None:
                return e[rename or key]
        return None

    finished = next((e for e in reversed(life) if e.get("kind") == "finished"), None)
    error = next((e for e in reversed(life) if e.get("kind") == "error"), None)
    exits = [e for e in mine if e.get("kind") == "exited"]
    exited = exits[-1] if exits and (not spawns or exits[-1]["ts"] >= spawns[-1]["ts"]) else None
    if finished is not None:
        status = str(finished.get("status", "finished"))
        err = None
    elif exited is not None:
        status = "killed" if exited.get("chaos") else "failed"
        rc = int(exited.get("returncode", 1))
        err = error["error"] if error else _exit_text(rc)
    elif error is not None:
        status, err = "failed", error["error"]
    else:
        pid = spawns[-1].get("pid") if spawns else None
        status = "running" if pid_alive(pid) else "lost"
        err = None if status == "running" else "ended without a word (killed?)"
    r = finished or {}
    record = {
        "name": name,
        "addr": addr,
        "status": status,
        "metrics": r.get("metrics"),
        "test_accuracy": r.get("test_accuracy"),
        "steps": r.get("steps", latest("steps", "step")),
        "samples": r.get("samples", latest("samples")),
        "exchanges": r.get("exchanges", latest("exchanges")),
        "bytes_sent": r.get("bytes_sent", latest("bytes_sent")),
        "bytes_received": r.get("bytes_received", latest("bytes_received")),
        "bytes": r.get("bytes", latest("bytes")),
        "compression_ratio": r.get("compression_ratio", latest("compression_ratio")),
        "payload_bytes": r.get("payload_bytes"),
        "pull_replies": r.get("pull_replies"),
        "wall_seconds": r.get("wall_seconds"),
        "linger_seconds": r.get("linger_seconds"),
        "final_model": r.get("final_model"),
        "checkpoint": r.get("checkpoint", latest("checkpoint")),
        "rejected_updates": r.get("rejected_updates"),
        "compress": r.get("compress"),
        "outer_steps": r.get("outer_steps"),
        "screening": r.get("screening"),
        "poisoned": r.get("poisoned"),
        "restarts": sum(1 for e in mine if e.get("kind") == "restarted"),
    }
    if err is not None:
        record["error"] = err
    return record


def total_bytes(peers: list[dict[str, Any]]) -> dict[str, dict[str, int]] | None:
    """The peers' bytes by kind, added up (None when no peer reported them: an older run)."""
    reported = [p["bytes"] for p in peers if isinstance(p.get("bytes"), dict)]
    if not reported:
        return None
    total: dict[str, dict[str, int]] = {}
    for kinds in reported:
        for kind, ways in kinds.items():
            into = total.setdefault(kind, {"sent": 0, "received": 0})
            for way in into:
                into[way] += int(ways.get(way) or 0)
    return total


def share(kinds: dict[str, dict[str, int]] | None, kind: str = "weights") -> float | None:
    """What fraction of the bytes sent went to ``kind`` (None without counts or traffic)."""
    if not kinds:
        return None
    sent = sum(int(w.get("sent") or 0) for w in kinds.values())
    return int((kinds.get(kind) or {}).get("sent") or 0) / sent if sent else None


def _run_compression(peers: list[dict[str, Any]]) -> float | None:
    """Raw over wire bytes of every exchange payload the peers sent (the run's ratio)."""
    sizes = [p["payload_bytes"] for p in peers if isinstance(p.get("payload_bytes"), dict)]
    wire = sum(int(s.get("wire") or 0) for s in sizes)
    return round(sum(int(s.get("raw") or 0) for s in sizes) / wire, 4) if wire else None


def _peer_dirs(run_dir: Path, run: dict[str, Any]) -> list[tuple[str, str, Path]]:
    return [(p["name"], p["addr"], run_dir / p["dir"]) for p in run["peers"]]


def discover(run_dir: Path) -> dict[str, Any] | None:
    """What run.json would say of a folder of ``peer-<i>`` folders that no launcher wrote
    (a Slurm job's: each task made its own): the peers as their events name them, time zero
    at the first event. None if there is no peer's events file."""
    peers: list[dict[str, Any]] = []
    first: list[float] = []
    folders = [d for d in run_dir.glob("peer-*") if d.name[5:].isdigit()]
    for folder in sorted(folders, key=lambda d: int(d.name[5:])):
        events = read_events(folder / "events.jsonl")
        listening = next((e for e in events if e.get("kind") == "listening"), None)
        if listening is None:
            continue
        first.append(float(events[0].get("ts", 0)))
        addr = str(listening.get("addr", ""))
        peers.append({"name": str(listening.get("name") or addr), "addr": addr, "dir": folder.name})
    return {"ts": min(first), "peers": peers} if peers else None


def build(run_dir: str | Path, wall: float | None = None, consensus: bool = True) -> dict:
    """summary.json's content for ``run_dir`` (and the consensus model, when it can)."""
    from ..evaluate import consensus as make_consensus

    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / RUN_FILE).read_text())
    except FileNotFoundError:
        found = discover(run_dir)
        if found is None:
            raise SummaryError(
                f"{run_dir}: not a run folder (no {RUN_FILE}, no peer-<i>/events.jsonl)"
            ) from None
        run = found
    except (OSError, ValueError) as exc:
        raise SummaryError(f"{run_dir / RUN_FILE}: unreadable ({exc})") from None
    t0 = float(run["ts"])
    launcher = read_events(run_dir / LAUNCHER_EVENTS)
    chaos = read_events(run_dir / CHAOS_EVENTS)
    peers: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []
    train_cfg: TrainConfig | None = None
    for name, addr, folder in _peer_dirs(run_dir, run):
        events = read_events(folder / "events.jsonl")
        peers.append(peer_record(name, addr, events, launcher))
        for e in events:
            (progress if e.get("kind") in SKIP_IN_EVENTS else timeline).append(e)
        if train_cfg is None and not run.get("script"):
            try:
                train_cfg = load_config(folder / "config.json").train
            except ConfigError:
                pass
    for e in (*launcher, *chaos):
        timeline.append(e)

    def relative(e: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in e.items() if k != "ts"}
        out["t"] = round(float(e.get("ts", t0)) - t0, 3)
        return out

    # A peer the chaos tool left poisoned ends with poison for weights: not in the consensus.
    finished = [
        (Path(p["final_model"]), float(p["samples"] or p["steps"] or 0))
        for p in peers
        if p["status"] == "finished"
        and p["final_model"]
        and Path(p["final_model"]).is_file()
        and not p.get("poisoned")
    ]
    cons_metrics = None
    cons_path = run_dir / "consensus.pt"
    if finished and consensus:
        print(f"consensus: averaging {len(finished)} final models", file=sys.stderr)
        meta: dict[str, Any] = {
            "peers": [
                p["name"] for p in peers if p["status"] == "finished" and not p.get("poisoned")
            ],
            "steps": sum(p["steps"] or 0 for p in peers),
            "samples": sum(p["samples"] or 0 for p in peers),
        }
        if train_cfg is not None:
            meta.update(
                model=train_cfg.model,
                dataset=train_cfg.dataset,
                data_dir=train_cfg.data_dir,
                seed=train_cfg.seed,
            )
        cons_metrics = make_consensus(finished, cons_path, meta, train_cfg, len(peers))
    ended = max((float(e.get("ts", t0)) for e in (*launcher, *timeline)), default=t0)
    summary = {
        "wall_seconds": round(wall if wall is not None else ended - t0, 3),
        "consensus_metrics": cons_metrics,
        "consensus_test_accuracy": (cons_metrics or {}).get("accuracy"),
        "consensus_model": str(cons_path) if finished and consensus else None,
        "config": run.get("config", {}),
        "peers": peers,
        "bytes": total_bytes(peers),
        "compression_ratio": _run_compression(peers),
        "network": run.get("network", {"mode": "loopback"}),
        "chaos": run.get("chaos"),
        "events": sorted((relative(e) for e in timeline), key=lambda e: e["t"]),
    }
    if summary["chaos"] is not None:
        applied = sum(1 for e in launcher if e.get("kind") == "fault")
        summary["chaos"] = {**summary["chaos"], "applied": applied}
    with open(run_dir / "progress.jsonl.tmp", "w") as fh:
        for e in sorted(progress, key=lambda e: e.get("ts", 0)):
            fh.write(json.dumps(relative(e)) + "\n")
    os.replace(run_dir / "progress.jsonl.tmp", run_dir / "progress.jsonl")
    return summary


def write(run_dir: str | Path, wall: float | None = None, consensus: bool = True) -> dict:
    """Build the summary and write RUN_DIR/summary.json (atomically)."""
    summary = build(run_dir, wall, consensus)
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


def start_run(run_dir: Path, info: dict[str, Any], ts: float | None = None) -> float:
    """Write run.json at the start of a run; its ``ts`` is the run's time zero."""
    ts = time.time() if ts is None else ts
    write_json(run_dir / RUN_FILE, {"ts": ts, **info})
    return ts
