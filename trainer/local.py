"""``gossip-train local``: N peer processes on 127.0.0.1, a live view, a summary.

Each peer is a ``gossip-train peer`` process (the same code users run across machines),
speaking real TCP on loopback. The launcher only starts them, reads the JSON events they
print, shows progress, and at the end builds the consensus model from their final weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import default_threads

GRACE_SECONDS = 5.0


@dataclass
class Child:
    index: int
    name: str
    addr: str
    run_dir: Path
    proc: asyncio.subprocess.Process | None = None
    last: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    status: str = "starting"
    started: float = 0.0
    restarts: int = 0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def peer_argv(args: argparse.Namespace, child: Child, n: int, seeds: list[str]) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "trainer.cli",
        "peer",
        "--events",
        "jsonl",
        "--listen",
        child.addr,
        "--name",
        child.name,
        "--index",
        str(child.index),
        "--num-peers",
        str(n),
        "--run-dir",
        str(child.run_dir),
        "--threads",
        str(args.threads or default_threads(n)),
        "--linger",
        str(2.0 if args.linger is None else args.linger),
    ]
    if seeds:
        argv += ["--join", ",".join(seeds)]
    if args.checkpoints or args.restart_failed:
        argv += ["--checkpoint-dir", str(child.run_dir / "checkpoints")]
    for flag in ("checkpoint_every", "checkpoint_seconds", "checkpoint_keep"):
        value = getattr(args, flag, None)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    for flag in (
        "dataset",
        "data_dir",
        "model",
        "partition",
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "period",
        "cluster",
        "profile",
    ):
        value = getattr(args, flag, None)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    return argv


class LocalRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        n = args.peers
        if n < 1:
            raise ValueError("--peers must be at least 1")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(args.run_dir or f"runs/{stamp}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ports = list(range(args.base_port, args.base_port + n)) if args.base_port else free_ports(n)
        self.children = [
            Child(i, f"peer-{i}", f"127.0.0.1:{ports[i]}", self.run_dir / f"peer-{i}")
            for i in range(n)
        ]
        self.events: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.tty = sys.stderr.isatty() and not args.no_progress
        self.stopping = False
        self._drawn = 0

    def event(self, child: Child, ev: dict[str, Any]) -> None:
        ts = ev.pop("ts", None)
        ev["t"] = round((ts or time.time()) - self.t0, 3)
        ev.setdefault("peer", child.name)
        kind = ev.get("kind")
        if kind == "progress":
            child.last = ev
            return
        if kind == "finished":
            child.result = ev
        if kind == "started":
            child.status = "training"
        self.events.append(ev)

    async def _read(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        while True:
            line = await child.proc.stdout.readline()
            if not line:
                return
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.event(child, ev)

    async def _start(self, child: Child, seeds: list[str]) -> None:
        child.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(child.run_dir / "log.txt", "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child.proc = await asyncio.create_subprocess_exec(
            *peer_argv(self.args, child, len(self.children), seeds),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        log.close()
        child.started = time.time()
        self.events.append(
            {
                "t": round(child.started - self.t0, 3),
                "peer": child.name,
                "kind": "spawned",
                "pid": child.proc.pid,
            }
        )

    async def _wait(self, child: Child) -> None:
        """Wait for the child to end; with --restart-failed, restart it while it crashes."""
        while True:
            assert child.proc is not None
            reader = asyncio.create_task(self._read(child))
            rc = await child.proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await reader
            if rc == 0 and child.result:
                child.status = str(child.result.get("status", "finished"))
                return
            child.status = "failed"
            self.note(
                child, "exited", returncode=rc, error=last_error_line(child.run_dir / "log.txt")
            )
            # Exit status 2 is a user error (bad flags, data): restarting cannot fix it.
            if not self.args.restart_failed or rc == 2 or self.stopping:
                return
            child.restarts += 1
            await asyncio.sleep(self.args.restart_delay)
            if self.stopping:
                return
            await self._start(child, [c.addr for c in self.children if c is not child])
            self.note(child, "restarted", restarts=child.restarts)

    def note(self, child: Child | None, kind: str, **fields: Any) -> None:
        ev = {"t": round(time.time() - self.t0, 3), "kind": kind, **fields}
        if child is not None:
            ev["peer"] = child.name
        self.events.append(ev)

    async def run(self) -> None:
        seeds = [self.children[0].addr]
        for c in self.children:
            await self._start(c, seeds if c.index else [])
        view = asyncio.create_task(self._view())
        try:
            async with asyncio.timeout(self.args.timeout):
                await asyncio.gather(*(self._wait(c) for c in self.children))
        except TimeoutError:
            self.events.append({"t": round(time.time() - self.t0, 3), "kind": "timeout"})
        finally:
            view.cancel()
            await self.stop_all()
            self._draw(final=True)

    async def stop_all(self) -> None:
        self.stopping = True
        live = [c for c in self.children if c.proc and c.proc.returncode is None]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                assert c.proc is not None
                os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.time() + GRACE_SECONDS
        for c in live:
            assert c.proc is not None
            try:
                async with asyncio.timeout(max(0.1, deadline - time.time())):
                    await c.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                await c.proc.wait()

    # -- live view ----------------------------------------------------------------------
    async def _view(self) -> None:
        while True:
            await asyncio.sleep(0.5 if self.tty else 5.0)
            if not self.args.no_progress:
                self._draw()

    def _rows(self) -> list[str]:
        rows = [
            f"{'peer':<8} {'status':<9} {'step':>13} {'loss':>7} {'exch':>5} {'alive':>5} "
            f"{'MB out':>7}"
        ]
        for c in self.children:
            ev = c.last
            step = f"{ev.get('step', 0)}/{ev.get('total', '?')}"
            loss = ev.get("loss")
            rows.append(
                f"{c.name:<8} {c.status:<9} {step:>13} "
                f"{(f'{loss:.3f}' if isinstance(loss, float) else '-'):>7} "
                f"{ev.get('exchanges', 0):>5} {ev.get('alive', 0):>5} "
                f"{ev.get('bytes_sent', 0) / 1e6:>7.1f}"
            )
        return rows

    def _draw(self, final: bool = False) -> None:
        if self.args.no_progress and not final:
            return
        rows = [f"t={time.time() - self.t0:6.1f}s  run dir {self.run_dir}", *self._rows()]
        if self.tty:
            if self._drawn:
                sys.stderr.write(f"\x1b[{self._drawn}F\x1b[J")
            sys.stderr.write("\n".join(rows) + "\n")
            self._drawn = len(rows)
        elif not final:
            done = sum(c.last.get("step", 0) for c in self.children)
            total = sum(c.last.get("total", 0) for c in self.children) or 1
            ex = sum(c.last.get("exchanges", 0) for c in self.children)
            sys.stderr.write(
                f"t={time.time() - self.t0:6.1f}s  {100 * done / total:5.1f}% of "
                f"steps, {ex} exchanges\n"
            )
        sys.stderr.flush()


def last_error_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else ""


def finish(run: LocalRun, wall: float) -> dict[str, Any]:
    """Consensus model, summary.json and the final table."""
    from .data import load_dataset
    from .evaluate import consensus

    args = run.args
    peers = []
    for c in run.children:
        r = c.result or {}
        peers.append(
            {
                "name": c.name,
                "addr": c.addr,
                "status": c.status,
                "test_accuracy": r.get("test_accuracy"),
                "steps": r.get("steps"),
                "samples": r.get("samples"),
                "exchanges": r.get("exchanges"),
                "bytes_sent": r.get("bytes_sent"),
                "bytes_received": r.get("bytes_received"),
                "wall_seconds": r.get("wall_seconds"),
                "final_model": r.get("final_model"),
            }
        )
    finished = [
        (Path(p["final_model"]), int(p["samples"]))
        for p in peers
        if p["status"] == "finished" and p["final_model"]
    ]
    cons_acc = None
    if finished:
        data = load_dataset(
            args.dataset or "default", Path(args.data_dir) if args.data_dir else None
        )
        meta = {
            "model": args.model or "mlp",
            "dataset": args.dataset or "default",
            "data_dir": args.data_dir,
            "peers": [p["name"] for p in peers if p["status"] == "finished"],
            "steps": sum(p["steps"] or 0 for p in peers),
            "samples": sum(n for _, n in finished),
        }
        cons_acc = consensus(
            finished, args.model or "mlp", data, run.run_dir / "consensus.pt", meta
        )
    summary = {
        "wall_seconds": round(wall, 3),
        "consensus_test_accuracy": cons_acc,
        "consensus_model": str(run.run_dir / "consensus.pt") if finished else None,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "peers": peers,
        "events": sorted(run.events, key=lambda e: e.get("t", 0)),
    }
    tmp = run.run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, run.run_dir / "summary.json")
    return summary


def print_table(summary: dict[str, Any], run_dir: Path) -> None:
    print(
        f"{'peer':<8} {'status':<9} {'accuracy':>8} {'steps':>6} {'exch':>5} {'MB out':>7} "
        f"{'MB in':>7} {'seconds':>7}"
    )
    for p in summary["peers"]:
        acc = p["test_accuracy"]
        print(
            f"{p['name']:<8} {p['status']:<9} "
            f"{(f'{acc:.4f}' if acc is not None else '-'):>8} {p['steps'] or 0:>6} "
            f"{p['exchanges'] or 0:>5} {(p['bytes_sent'] or 0) / 1e6:>7.1f} "
            f"{(p['bytes_received'] or 0) / 1e6:>7.1f} {p['wall_seconds'] or 0:>7.1f}"
        )
    cons = summary["consensus_test_accuracy"]
    if cons is not None:
        print(f"consensus model: test accuracy {cons:.4f} -> {run_dir / 'consensus.pt'}")
    print(f"wall time {summary['wall_seconds']:.1f} s; summary: {run_dir / 'summary.json'}")


def run_local(args: argparse.Namespace) -> int:
    from .cli import run_async

    run = LocalRun(args)
    t0 = time.time()
    try:
        run_async(run.run())
    except KeyboardInterrupt:
        run_async(run.stop_all())
        raise
    summary = finish(run, time.time() - t0)
    print_table(summary, run.run_dir)
    failed = [c for c in run.children if c.status != "finished"]
    if failed:
        errors = {e.get("error") for e in run.events if e.get("kind") == "exited"}
        for err in sorted(e for e in errors if e):
            print(f"gossip-train: peer failed: {err}", file=sys.stderr)
        return 1
    return 0
