"""Real peer processes for tests: start, read their JSON events, signal them."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, cli


class PeerProc:
    def __init__(self, name: str, run_dir: Path, *args: str) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log = run_dir / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                cli(
                    "peer",
                    "--name",
                    name,
                    "--events",
                    "jsonl",
                    "--run-dir",
                    str(run_dir / name),
                    *args,
                ),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.addr = self.wait_for(lambda e: e["kind"] == "listening", 60)["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.events.append(ev)
            self._q.put(ev)

    def wait_for(self, pred, timeout: float) -> dict[str, Any]:
        for ev in list(self.events):
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if pred(ev):
                return ev
        raise TimeoutError(f"{self.name}: no matching event within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
