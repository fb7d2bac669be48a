"""A run folder as the report reads it: every peer's events, the launcher's, the summary.

Only files, never a live process: ``peer-<i>/events.jsonl`` (each peer's own events),
``launcher.jsonl`` and ``chaos-events.jsonl`` (starts, exits, restarts, faults),
``summary.json`` and ``consensus.json`` when the run got that far, and a chaos run's
``report.json``. A folder without ``run.json`` or ``summary.json`` (a launcher killed early,
or files copied from several machines) still reports: the peers are found by their folders,
time zero is the earliest event, and each peer's record is rebuilt from its events the way
``gossip-train summary`` builds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.events import read_events

from ..launch import summary as run_summary
from ..runtime import UserError

PEER_DIR = re.compile(r"peer-(\d+)$")
# Membership events and the state each says its subject is in (as the observer sees it).
MEMBER_STATES = {
    "joined": "alive",
    "alive": "alive",
    "suspect": "suspect",
    "declared_dead": "dead",
    "left": "left",
}


class ReportError(UserError):
    """RUN_DIR holds nothing to report on: one line, exit status 2."""


@dataclass
class PeerLog:
    """One peer folder: its name and its events, oldest first."""

    name: str
    folder: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") in kinds]


@dataclass
class RunFiles:
    run_dir: Path
    t0: float
    end: float
    peers: list[PeerLog]
    launcher: list[dict[str, Any]]  # launcher.jsonl and chaos-events.jsonl, oldest first
    summary: dict[str, Any] | None
    consensus: dict[str, Any] | None  # the consensus model's metrics
    chaos: dict[str, Any] | None  # a chaos run's report.json

    def t(self, event: dict[str, Any]) -> float:
        """Seconds since the run started (the launcher's clock, as in summary.json)."""
        return float(event.get("ts", self.t0)) - self.t0

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.peers]

    @property
    def metric(self) -> str:
        """The headline metric: the first one the task reports (accuracy if none did)."""
        for record in self.records():
            if record.get("metrics"):
                return str(next(iter(record["metrics"])))
        for p in self.peers:
            for e in p.of("eval"):
                if isinstance(e.get("metrics"), dict) and e["metrics"]:
                    return str(next(iter(e["metrics"])))
        return "accuracy"

    def records(self) -> list[dict[str, Any]]:
        """Each peer's record: summary.json's when there is one, else rebuilt from events."""
        if self.summary is not None and isinstance(self.summary.get("peers"), list):
            return list(self.summary["peers"])
        return [run_summary.peer_record(p.name, "", p.events, self.launcher) for p in self.peers]

    def faults(self) -> list[dict[str, Any]]:
        return [e for e in self.launcher if e.get("kind") in ("fault", "fault_failed")]


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing or unreadable (a report of
    what is there beats no report)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _peer_folders(run_dir: Path, run: dict[str, Any] | None) -> list[tuple[str, Path]]:
    """(name, folder) of every peer: run.json's list, else the peer-<i> folders in order."""
    if run is not None and isinstance(run.get("peers"), list):
        return [(str(p["name"]), run_dir / str(p["dir"])) for p in run["peers"]]
    found = [(int(m.group(1)), d) for d in run_dir.iterdir() if (m := PEER_DIR.match(d.name))]
    return [(d.name, d) for _, d in sorted(found)]


def _name_of(folder: Path, events: list[dict[str, Any]]) -> str:
    """The name the peer gave itself (its events say it), else its folder's."""
    for e in events:
        if e.get("kind") == "listening" and isinstance(e.get("name"), str):
            return str(e["name"])
    return folder.name


def load(run_dir: str | Path) -> RunFiles:
    """Read everything the report draws from ``run_dir``; ``ReportError`` if no peer wrote
    a single event there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such folder")
    run = _json(run_dir / run_summary.RUN_FILE)
    peers: list[PeerLog] = []
    for name, folder in _peer_folders(run_dir, run):
        events = sorted(read_events(folder / "events.jsonl"), key=lambda e: e.get("ts", 0))
        if run is None:
            name = _name_of(folder, events)
        peers.append(PeerLog(name, folder, events))
    if not any(p.events for p in peers):
        raise ReportError(f"{run_dir}: no peer events found")
    launcher = read_events(run_dir / run_summary.LAUNCHER_EVENTS)
    launcher += read_events(run_dir / run_summary.CHAOS_EVENTS)
    launcher.sort(key=lambda e: e.get("ts", 0))
    stamps = [float(e["ts"]) for p in peers for e in p.events if "ts" in e]
    stamps += [float(e["ts"]) for e in launcher if "ts" in e]
    t0 = float(run["ts"]) if run is not None and "ts" in run else min(stamps)
    summary = _json(run_dir / "summary.json")
    consensus = (summary or {}).get("consensus_metrics")
    if not consensus:
        consensus = (_json(run_dir / "consensus.json") or {}).get("metrics")
    return RunFiles(
        run_dir=run_dir,
        t0=t0,
        end=max(stamps),
        peers=peers,
        launcher=launcher,
        summary=summary,
        consensus=consensus if isinstance(consensus, dict) else None,
        chaos=_json(run_dir / "report.json"),
    )
