"""Crash recovery: how soon a restarted peer is back in the exchange rotation, how much work
a kill -9 loses.

Starts a swarm of ``--peers`` ``gossip-train peer`` processes on 127.0.0.1 (one torch
thread each, the bundled data set, a checkpoint every ``--every`` steps and no time-based
ones), lets it train, then ``--kills`` times: waits a random 1-3 s, asks the victim its step
over STATUS, kills it with SIGKILL at once, and restarts it with the same command line plus
``--join`` of the others, as ``gossip-train local --restart-failed`` does. Victims rotate
over all peers, the first one included.

Measured from the restarted process's start (just before fork/exec), on one clock:

- listening, resumed, joined, caught_up, started: the peer's own JSON events;
- rotation: its first completed exchange, found by polling its STATUS every 20 ms until its
  exchange counter (exchanges it started or answered) is above zero;
- lost steps: its step at the kill (the STATUS answer just before SIGKILL, so a lower bound
  by the one or two steps it takes to deliver the signal) minus the step it resumed from;
  lost seconds: the kill's time minus the resumed checkpoint's time stamp.

It also times ``python -c "import torch"`` alone: the floor of any fresh process start.

``--mode local`` measures the same under ``gossip-train local --restart-failed``, which
forks a restarted peer from its pre-loaded zygote instead of starting a fresh interpreter:
the victim is found in RUN_DIR/peers.json, and the times come from the run's summary.json
(spawned, resumed, caught_up, started, and first_exchange: the first exchange the peer
itself started, so an upper bound on its return to the rotation). ``--mode both`` (the
default) runs the two one after the other.

Run: .venv/bin/python benchmarks/recovery.py [--quick] [--mode peer|local|both] [--peers 3]
     [--kills 6] [--every 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    REPO,
    emit,
    machine_info,
    markdown_table,
    read_peers,
    read_proc,
    run_keyring,
    start_local,
)

from p2p.transport import TransportError
from trainer.status import fetch_status

POLL = 0.02  # seconds between STATUS polls while waiting for the first exchange
START_TIMEOUT = 120.0  # a fresh process on a loaded machine can take this long to train
EVENTS = ("listening", "resumed", "joined", "caught_up", "started")


@dataclass
class Life:
    """One process of one peer and the events it printed (``ts`` is its wall clock)."""

    name: str
    proc: subprocess.Popen[str]
    started: float  # time.time() just before the process was created
    events: list[dict[str, Any]] = field(default_factory=list)

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e["kind"] == kind), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, argv: list[str], err: Path) -> Life:
    cmd = [sys.executable, "-m", "trainer.cli", "peer", "--events", "jsonl", *argv]
    t0 = time.time()
    with open(err, "ab") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    life = Life(name, proc, t0)
    threading.Thread(target=_read, args=(life,), daemon=True).start()
    return life


def _read(life: Life) -> None:
    assert life.proc.stdout is not None
    for line in life.proc.stdout:
        try:
            life.events.append(json.loads(line))
        except ValueError:
            continue


def wait_until(what: str, check: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(POLL)
    raise RuntimeError(f"timed out waiting for {what}")


# The keyring of the `local` run being measured (its peers admit nobody without it).
KEYRING: Any = None


async def _status(addr: str) -> dict[str, Any] | None:
    try:
        return await fetch_status(addr, timeout=2.0, keyring=KEYRING)
    except (TransportError, OSError, TimeoutError):
        return None  # not listening yet, or busy starting


def status(addr: str) -> dict[str, Any] | None:
    return asyncio.run(_status(addr))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (a fork starts at zero), from /proc."""
    got = read_proc(pid)
    return got[0] if got is not None else None


def first_exchange(addr: str, timeout: float = START_TIMEOUT) -> float:
    """Poll STATUS until ``addr`` has completed an exchange; the time of that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(addr)
        if st is not None and st.get("exchanges", 0) > 0:
            return time.time()
        time.sleep(POLL)
    raise RuntimeError(f"{addr} never exchanged within {timeout} s")


def newest_checkpoint(folder: Path) -> tuple[int, float]:
    """Step and time stamp of the newest checkpoint that loads: what a restart resumes."""
    for path in sorted(folder.glob("ckpt-*.pt"), reverse=True):
        try:
            ckpt = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - the peer skips such a file too
            continue
        return int(ckpt["step"]), float(ckpt["time"])
    raise RuntimeError(f"no loadable checkpoint in {folder}")


def step_rate(life: Life) -> float:
    """Steps per second over the last two progress events of a life."""
    prog = [e for e in list(life.events) if e["kind"] == "progress"]
    if len(prog) < 2:
        return float("nan")
    a, b = prog[-2], prog[-1]
    return (b["step"] - a["step"]) / max(1e-9, b["ts"] - a["ts"])


class Swarm:
    def __init__(self, n: int, every: int, base: Path) -> None:
        self.base = base
        self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        self.every = every
        self.lives: list[Life] = []
        self.n = n

    def argv(self, i: int) -> list[str]:
        return [
            "--name",
            f"peer-{i}",
            "--listen",
            self.addrs[i],
            "--index",
            str(i),
            "--num-peers",
            str(self.n),
            "--threads",
            "1",
            "--epochs",
            "100000",  # runs until stopped
            "--linger",
            "0",
            "--run-dir",
            str(self.base / f"peer-{i}"),
            "--checkpoint-dir",
            str(self.base / f"peer-{i}" / "ck"),
            "--checkpoint-every",
            str(self.every),
            "--checkpoint-seconds",
            "0",
        ]

    def start_all(self) -> None:
        self.lives = [start("peer-0", self.argv(0), self.base / "peer-0.err")]
        wait_until("peer-0 listening", lambda: self.lives[0].first("listening"))
        for i in range(1, self.n):
            argv = [*self.argv(i), "--join", self.addrs[0]]
            self.lives.append(start(f"peer-{i}", argv, self.base / f"peer-{i}.err"))
        for i in range(self.n):
            first_exchange(self.addrs[i])

    def restart(self, i: int) -> Life:
        others = ",".join(a for j, a in enumerate(self.addrs) if j != i)
        life = start(f"peer-{i}", [*self.argv(i), "--join", others], self.base / f"peer-{i}.err")
        self.lives[i] = life
        return life

    def stop(self) -> None:
        for life in self.lives:
            if life.proc.poll() is None:
                life.proc.send_signal(signal.SIGTERM)
        for life in self.lives:
            try:
                life.proc.wait(30)
            except subprocess.TimeoutExpired:
                life.proc.kill()
                life.proc.wait()


def one_kill(swarm: Swarm, victim: int, rng: random.Random) -> dict[str, Any]:
    time.sleep(rng.uniform(1.0, 3.0))
    old = swarm.lives[victim]
    rate = step_rate(old)
    before = status(swarm.addrs[victim])
    t_kill = time.time()
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    if before is None:
        raise RuntimeError(f"peer-{victim} did not answer STATUS before the kill")
    ck_step, ck_time = newest_checkpoint(swarm.base / f"peer-{victim}" / "ck")
    life = swarm.restart(victim)
    t_rot = first_exchange(swarm.addrs[victim])
    # CPU the new process spent to get there: on an idle machine, about its wall time.
    cpu = cpu_seconds(life.proc.pid)
    resumed = wait_until("resumed", lambda: life.first("resumed"))
    if resumed["step"] != ck_step:
        raise RuntimeError(f"resumed from step {resumed['step']}, newest good is {ck_step}")
    row: dict[str, Any] = {"victim": f"peer-{victim}", "rotation_s": t_rot - life.started}
    for kind in EVENTS:
        ev = life.first(kind)
        row[f"{kind}_s"] = None if ev is None else ev["ts"] - life.started
    # The part recovery itself owns: from listening (interpreter, torch, data and checkpoint
    # loaded) to the first exchange.
    row["listening_to_rotation_s"] = t_rot - life.started - row["listening_s"]
    row["rotation_cpu_s"] = cpu
    row.update(
        step_at_kill=int(before["step"]),
        resumed_step=int(resumed["step"]),
        lost_steps=int(before["step"]) - int(resumed["step"]),
        lost_s=t_kill - ck_time,
        steps_per_s=rate,
        interval_s=swarm.every / rate if rate > 0 else None,
        incarnation=resumed["incarnation"],
    )
    return row


def free_port_run(n: int) -> int:
    """A first port P with P .. P+n-1 all free now (local --base-port takes consecutive ones)."""
    for _ in range(100):
        first = random.randint(20000, 60000 - n)
        try:
            socks = []
            for port in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports")


def restarts_from_summary(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per restart, seconds from the fork ("spawned") to each of the peer's events."""
    rows = []
    events = summary["events"]
    for i, ev in enumerate(events):
        if ev["kind"] != "restarted":
            continue
        peer = ev["peer"]
        spawned = next(
            e for e in reversed(events[:i]) if e["peer"] == peer and e["kind"] == "spawned"
        )
        later = [e for e in events[i:] if e.get("peer") == peer]
        row: dict[str, Any] = {"victim": peer}
        for kind in ("resumed", "caught_up", "started", "first_exchange"):
            found = next((e for e in later if e["kind"] == kind), None)
            row[f"{kind}_s"] = None if found is None else found["t"] - spawned["t"]
        row["resumed_step"] = next((e["step"] for e in later if e["kind"] == "resumed"), None)
        rows.append(row)
    return rows


def measure_local(peers: int, kills: int, every: int, seed: int, base: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    run_dir = base / "local"
    args = [
        "--peers",
        str(peers),
        "--epochs",
        "100000",
        "--restart-failed",
        "--restart-delay",
        "0.5",
        "--checkpoint-every",
        str(every),
        "--checkpoint-seconds",
        "0",
        "--base-port",
        str(free_port_run(peers)),
        "--linger",
        "0",
        # The run ends by this timeout, after the kills; the launcher then stops the peers
        # and writes summary.json.
        "--timeout",
        str(40 + 10 * kills),
    ]
    # Its output goes to local.out; no /proc sampling (this script reads what it needs).
    local = start_local(run_dir, args, interval=None)
    global KEYRING
    deadline = time.monotonic() + 60
    while not (run_dir / "secret").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    KEYRING = run_keyring(run_dir)
    kills_done = []
    try:

        def all_spawned() -> list[dict[str, Any]]:
            found = read_peers(run_dir)
            return found if len(found) == peers and all(p["pid"] for p in found) else []

        info = wait_until("peers.json", all_spawned)
        for p in info:
            first_exchange(p["addr"])
        for k in range(kills):
            time.sleep(rng.uniform(1.0, 3.0))
            victim = read_peers(run_dir)[k % peers]
            before = status(victim["addr"])
            t_kill = time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            if before is None:
                raise RuntimeError(f"{victim['name']} did not answer STATUS before the kill")
            ck_step, ck_time = newest_checkpoint(run_dir / victim["name"] / "checkpoints")
            t_back = first_exchange(victim["addr"])
            now = next(p for p in read_peers(run_dir) if p["name"] == victim["name"])
            cpu = cpu_seconds(now["pid"]) if now["pid"] not in (None, victim["pid"]) else None
            kills_done.append(
                {
                    "victim": victim["name"],
                    "step_at_kill": int(before["step"]),
                    "lost_steps": int(before["step"]) - ck_step,
                    "lost_s": t_kill - ck_time,
                    "down_s": t_back - t_kill,
                    "rotation_cpu_s": cpu,
                }
            )
        summary = local.wait(timeout=40 + 10 * kills + 60, check=False).summary
    finally:
        local.stop()
    rows = restarts_from_summary(summary)
    for row, kill in zip(rows, kills_done, strict=True):
        if (
            row["victim"] != kill["victim"]
            or row["resumed_step"] != kill["step_at_kill"] - kill["lost_steps"]
        ):
            raise RuntimeError(f"summary and kills disagree: {row} vs {kill}")
        row.update(kill)
    fx = [r["first_exchange_s"] for r in rows if r["first_exchange_s"] is not None]
    tail = [
        r["first_exchange_s"] - r["resumed_s"]
        for r in rows
        if r["first_exchange_s"] is not None and r["resumed_s"] is not None
    ]
    return {
        "kills": rows,
        "resumed_to_exchange_max_s": max(tail) if tail else None,
        "rotation_cpu_max_s": max_known(r["rotation_cpu_s"] for r in rows),
        "first_exchange_median_s": statistics.median(fx) if fx else None,
        "first_exchange_max_s": max(fx) if fx else None,
        "lost_steps_max": max(r["lost_steps"] for r in rows),
        "lost_s_max": max(r["lost_s"] for r in rows),
    }


def max_known(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def torch_import_seconds(reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(peers: int, kills: int, every: int, seed: int, base: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    swarm = Swarm(peers, every, base)
    rows = []
    try:
        swarm.start_all()
        for k in range(kills):
            rows.append(one_kill(swarm, k % peers, rng))
    finally:
        swarm.stop()
    rot = [r["rotation_s"] for r in rows]
    tail = [r["listening_to_rotation_s"] for r in rows]
    return {
        "kills": rows,
        "rotation_median_s": statistics.median(rot),
        "rotation_max_s": max(rot),
        "listening_to_rotation_median_s": statistics.median(tail),
        "listening_to_rotation_max_s": max(tail),
        "rotation_cpu_max_s": max_known(r["rotation_cpu_s"] for r in rows),
        "lost_steps_max": max(r["lost_steps"] for r in rows),
        "lost_s_max": max(r["lost_s"] for r in rows),
        "torch_import_s": torch_import_seconds(),
    }


def _cell(v: Any) -> Any:
    return "-" if v is None else v


def peer_table(result: dict[str, Any], every: int) -> str:
    rows = [
        [
            r["victim"],
            *(_cell(r[f"{kind}_s"]) for kind in EVENTS),
            r["rotation_s"],
            r["listening_to_rotation_s"],
            _cell(r["rotation_cpu_s"]),
            r["lost_steps"],
            every,
            r["lost_s"],
            _cell(r["interval_s"]),
        ]
        for r in result["kills"]
    ]
    head = [f"{kind.replace('_', ' ')} s" for kind in EVENTS]
    return markdown_table(
        [
            "victim",
            *head,
            "rotation s",
            "listening to rotation s",
            "CPU s to rotation",
            "lost steps",
            "interval steps",
            "lost s",
            "interval s",
        ],
        rows,
    )


def local_table(result: dict[str, Any], every: int) -> str:
    rows = [
        [
            r["victim"],
            _cell(r["resumed_s"]),
            _cell(r["caught_up_s"]),
            _cell(r["started_s"]),
            _cell(r["first_exchange_s"]),
            r["down_s"],
            _cell(r["rotation_cpu_s"]),
            r["lost_steps"],
            every,
            r["lost_s"],
        ]
        for r in result["kills"]
    ]
    return markdown_table(
        [
            "victim",
            "resumed s",
            "caught up s",
            "started s",
            "first exchange s",
            "kill to back s",
            "CPU s to rotation",
            "lost steps",
            "interval steps",
            "lost s",
        ],
        rows,
    )


def target_table(out: dict[str, Any], every: int) -> str:
    rows = []
    if "peer" in out:
        r = out["peer"]
        rows.append(
            [
                "fresh `gossip-train peer`: back in rotation <= 3 s from process start",
                f"worst {r['rotation_max_s']:.2f} s, median {r['rotation_median_s']:.2f} s",
                "yes" if r["rotation_max_s"] <= 3.0 else "no",
            ]
        )
        rows.append(
            [
                "fresh `gossip-train peer`: CPU time from start to rotation",
                f"worst {_cell(r['rotation_cpu_max_s'])} s",
                "",
            ]
        )
        rows.append(
            [
                "fresh `gossip-train peer`: listening to first exchange",
                f"worst {r['listening_to_rotation_max_s']:.2f} s, median "
                f"{r['listening_to_rotation_median_s']:.2f} s",
                "",
            ]
        )
    if "local" in out and out["local"]["first_exchange_max_s"] is not None:
        r = out["local"]
        rows.append(
            [
                "`local --restart-failed` (fork): first exchange <= 3 s from the fork",
                f"worst {r['first_exchange_max_s']:.2f} s, median "
                f"{r['first_exchange_median_s']:.2f} s",
                "yes" if r["first_exchange_max_s"] <= 3.0 else "no",
            ]
        )
        rows.append(
            [
                "`local --restart-failed`: CPU time from fork to rotation",
                f"worst {_cell(r['rotation_cpu_max_s'])} s",
                "",
            ]
        )
        if r["resumed_to_exchange_max_s"] is not None:
            rows.append(
                [
                    "`local --restart-failed`: resumed to first exchange",
                    f"worst {r['resumed_to_exchange_max_s']:.2f} s",
                    "",
                ]
            )
    lost = max(out[m]["lost_steps_max"] for m in ("peer", "local") if m in out)
    rows.append(
        [
            "lost work <= one checkpoint interval",
            f"worst {lost} steps of {every}",
            "yes" if lost <= every else "no",
        ]
    )
    if "torch_import_s" in out:
        rows.append(["`python -c 'import torch'` alone", f"{out['torch_import_s']:.2f} s", ""])
    return markdown_table(["target", "measured", "met"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("peer", "local", "both"), default="both")
    parser.add_argument("--peers", type=int, default=3, help="peers in the swarm")
    parser.add_argument("--kills", type=int, default=6, help="kill -9 and restart this often")
    parser.add_argument("--every", type=int, default=200, help="checkpoint every K steps")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 kills")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    kills = 2 if args.quick else args.kills
    out: dict[str, Any] = {
        "benchmark": "recovery",
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "params": {"peers": args.peers, "kills": kills, "every": args.every, "seed": args.seed},
    }
    tabs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode in ("peer", "both"):
            out["peer"] = measure(args.peers, kills, args.every, args.seed, Path(tmp))
            out["torch_import_s"] = out["peer"].pop("torch_import_s")
            tabs.append(peer_table(out["peer"], args.every))
        if args.mode in ("local", "both"):
            out["local"] = measure_local(args.peers, kills, args.every, args.seed, Path(tmp))
            tabs.append(local_table(out["local"], args.every))
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    emit(out, [*tabs, target_table(out, args.every)], args.json)


if __name__ == "__main__":
    main()
