"""Shared pieces of the benchmark scripts: paths, timing summaries, output, helper processes.

Every benchmark prints one JSON object (machine-readable, with the machine it ran on) and
then a markdown table (for docs/). Helper processes announce themselves with one stdout
line ``READY <address>``; the parent reads it under a deadline so a helper that dies or
hangs at start-up fails the benchmark instead of stalling it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
READY = "READY"


def command_line() -> str:
    """How this benchmark was started, interpreter flags included."""
    flags = ["-O"] if sys.flags.optimize else []
    return " ".join([Path(sys.executable).name, *flags, *sys.argv])


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; benchmark results mean nothing without it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": code_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def code_version() -> str:
    """The commit measured, with "+dirty" when the code under test differs from it.

    Several people change this working tree at once: the commit alone does not say what ran.
    """
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "p2p", "gossip", "trainer")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class Summary:
    n: int  # number of timed repetitions
    median: float  # seconds
    best: float  # seconds, the fastest repetition
    worst: float  # seconds, the slowest repetition

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "median_s": self.median, "best_s": self.best, "worst_s": self.worst}


def summarize(seconds: Sequence[float]) -> Summary:
    if not seconds:
        raise ValueError("summarize: no timings")
    return Summary(len(seconds), statistics.median(seconds), min(seconds), max(seconds))


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def paired_ratios(
    reps: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """``time_to_target_s`` of a over b for each (a, b), paired within each rep, and the
    median of the pairs; a pair is left out where either run missed the target."""
    out = {}
    for a, b in pairs:
        if a not in reps or b not in reps:
            continue
        each = [
            ra["time_to_target_s"] / rb["time_to_target_s"]
            for ra, rb in zip(reps[a], reps[b], strict=True)
            if ra["time_to_target_s"] and rb["time_to_target_s"]
        ]
        out[f"{a} / {b}"] = {"median": median(each), "each": each}
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(result: dict[str, Any], tables: Sequence[str], json_path: Path | None = None) -> None:
    """Print the JSON object, then the tables; optionally also write the JSON to a file."""
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    print()
    for table in tables:
        print(table)
        print()
    if json_path is not None:
        json_path.write_text(text + "\n")


def python_cmd() -> list[str]:
    """This interpreter, with this run's -O flag passed on to the helper."""
    return [sys.executable, *(["-O"] if sys.flags.optimize else [])]


def mb_per_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The address in the ``READY <addr>`` line a helper prints; RuntimeError if none comes."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                return line.split(maxsplit=1)[1].strip()
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"helper {proc.args!r} did not start (exit {proc.poll()})")


def read_result(out: str) -> dict[str, Any] | None:
    """The JSON of the ``RESULT <json>`` line a worker printed, or None if it printed none."""
    for line in out.splitlines():
        if line.startswith("RESULT "):
            found: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return found
    return None


def run_ranks(
    cmds: Sequence[Sequence[str]],
    env: dict[str, str],
    deadline: float,
    parse: Callable[[str, int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Start one process per command (rank order), wait for all until ``deadline``
    (time.time()), and return ``parse(stdout, rank)`` of each; any failure kills the rest."""
    procs = [
        subprocess.Popen(list(cmd), cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
        for cmd in cmds
    ]
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
            if proc.returncode != 0:
                raise RuntimeError(f"rank {rank}/{len(procs)} exited with {proc.returncode}")
            results.append(parse(out, rank))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


class Helper:
    """A helper process started with ``python <script> <args>`` that prints ``READY <addr>``."""

    def __init__(self, script: str, args: Sequence[str], ready_timeout: float = 60.0) -> None:
        cmd = [*python_cmd(), str(BENCH_DIR / script), *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.addr = self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> str:
        return wait_ready(self.proc, timeout)

    def stop(self, timeout: float = 10.0) -> str:
        """Close its stdin (the helper exits on EOF), then escalate to kill; return its output."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=timeout)
        except ValueError:  # already stopped: its pipes are closed
            out = ""
        return out or ""

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def announce(addr: str) -> None:
    """Helper side: tell the parent where we listen."""
    print(f"{READY} {addr}", flush=True)
