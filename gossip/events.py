"""One way for events: each peer appends them to its own file, and may also send them to a
watcher on a best-effort channel.

An event is one JSON object per line: ``{"ts": unix time, "peer": name, "kind": ..., ...}``.
``EventFile`` appends and flushes every event, so the file holds everything up to the last
event even after a SIGKILL; the launcher, ``gossip-train summary`` and the report read it.
``Channel`` writes to a watcher's pipe without ever blocking or raising: a watcher that
stops reading, pauses or dies costs the peer nothing but the events it misses (counted).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]

# Bytes a channel keeps for a watcher that is behind; beyond this, new events are dropped.
CHANNEL_BACKLOG = 1 << 20


def encode(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, default=str) + "\n").encode()


class EventFile:
    """Append-only JSON lines, flushed per event. A failing disk is noted once, never raised."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.failed: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        data = encode(event)
        with self._lock:
            if self._fh.closed:
                return
            try:
                # One write per line: O_APPEND keeps a line whole, whoever else appends.
                self._fh.write(data)
            except OSError as exc:
                if self.failed is None:
                    log.warning("events file %s: %s; events are no longer saved", self.path, exc)
                self.failed = str(exc)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class Channel:
    """Events to a watcher over a file descriptor (a pipe), best effort.

    On a pipe the descriptor is made non-blocking: a full pipe keeps up to
    ``CHANNEL_BACKLOG`` bytes here and drops whole events beyond that, and a closed one
    (the watcher died) ends the channel with one log line. Never blocks, never raises.
    """

    def __init__(self, fd: int, backlog: int = CHANNEL_BACKLOG) -> None:
        self.fd = fd
        self.backlog = backlog
        self.dropped = 0
        self.broken = False
        self._pending = b""
        self._lock = threading.Lock()
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.set_blocking(fd, False)
        except OSError as exc:
            self._break(exc)

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self.broken:
                return
            data = encode(event)
            if len(self._pending) + len(data) > self.backlog:
                self.dropped += 1
                data = b""
            self._pending += data
            try:
                while self._pending:
                    n = os.write(self.fd, self._pending)
                    self._pending = self._pending[n:]
            except BlockingIOError:
                pass  # the watcher is behind: the rest waits for the next event
            except OSError as exc:
                self._break(exc)

    def _break(self, exc: OSError) -> None:
        self.broken = True
        self._pending = b""
        log.warning("event channel closed (%s); events still go to the events file", exc)


class Events:
    """What a peer reports through: its events file and, optionally, a channel and taps
    (in-process readers: live metrics, TensorBoard)."""

    def __init__(self, file: EventFile | None = None, channel: Channel | None = None) -> None:
        self.file = file
        self.channel = channel
        self.name = "?"
        # Called with every event after the file and channel have it. A tap that raises is
        # dropped with one log line: monitoring must never stop a peer.
        self.taps: list[Reporter] = []

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"ts": round(time.time(), 6), "peer": self.name, "kind": kind, **fields}
        self(event)
        return event

    def __call__(self, event: dict[str, Any]) -> None:
        if self.file is not None:
            self.file(event)
        if self.channel is not None:
            self.channel(event)
        for tap in list(self.taps):
            try:
                tap(event)
            except Exception as exc:  # noqa: BLE001 - see taps
                log.warning("event tap %r failed (%s); it gets no more events", tap, exc)
                if tap in self.taps:
                    self.taps.remove(tap)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every whole event in a file; a torn last line (a kill mid-write) is skipped."""
    out: list[dict[str, Any]] = []
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return out
    for line in raw.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out
