"""Real peer processes for tests: start one, read its JSON events as they come, signal it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conftest import ROOT, cli

Event = dict[str, Any]


class PeerProc:
    """One process of a peer: ``gossip-train peer --events jsonl ARGS``, its stderr appended
    to the file ``stderr``, its events in ``events`` as they come (a reader thread).

    ``PeerProc.named`` starts one under a name and returns once it listens. ``kill`` and
    ``close`` wait for the process and close its pipe; calling them again does no harm, so
    a test's cleanup may call ``kill`` on every peer it started, ended or not."""

    def __init__(self, args: Sequence[str], stderr: Path, name: str = "peer") -> None:
        self.name = name
        self.stderr = stderr
        self.addr = ""  # set by named(), from the "listening" event
        self.events: list[Event] = []
        self._cond = threading.Condition()
        with open(stderr, "ab") as err:
            self.proc = subprocess.Popen(
                cli("peer", "--events", "jsonl", *args),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def named(cls, name: str, run_dir: Path, *args: str) -> PeerProc:
        """Peer ``name`` with its run dir in run_dir/NAME and its stderr in run_dir/NAME.log,
        returned once it listens; ``addr`` is the address it listens on."""
        peer = cls(
            ["--name", name, "--run-dir", str(run_dir / name), *args],
            run_dir / f"{name}.log",
            name,
        )
        try:
            peer.addr = peer.wait_for("listening", timeout=60.0)["addr"]
        except BaseException:
            peer.kill()
            raise
        return peer

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, kind: str, pred: Callable[[Event], bool] = lambda e: True, timeout: float = 90.0
    ) -> Event:
        """The first event of ``kind`` that satisfies ``pred``, seen already or to come; fails
        if the process ends first or nothing comes within ``timeout`` seconds (the default
        90 s: a loaded 2-core machine starts torch slowly)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event["kind"] == kind and pred(event):
                        return event
                if not self._reader.is_alive():
                    raise AssertionError(f"{self.name} exited before {kind}: {self.err_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: no {kind} event within {timeout} s: {self.err_tail()}"
                    )
                self._cond.wait(min(left, 1.0))

    def of(self, kind: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["kind"] == kind]

    def kill(self) -> int:
        """SIGKILL (when it still runs), then close: its return code."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.close(10.0)

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the process to end, read the rest of its events and
        close its pipe; returns its return code. One still running after ``timeout`` is
        killed, and subprocess.TimeoutExpired raised."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(10.0)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return rc

    def err_tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-2000:]
