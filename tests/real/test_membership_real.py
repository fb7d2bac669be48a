"""Membership with real peer processes training at full speed on 127.0.0.1."""

import os
import signal
import subprocess
import time

import pytest
from conftest import ROOT, cli
from peerproc import PeerProc

pytestmark = pytest.mark.real


def alive_count(peer):
    progress = [e for e in peer.events if e["kind"] == "progress"]
    return progress[-1]["alive"] if progress else 0


def test_kill_is_detected_and_a_short_pause_is_not(tmp_path):
    common = ("--epochs", "10000", "--num-peers", "4")
    first = PeerProc.named("p0", tmp_path, "--index", "0", *common)
    peers = [first] + [
        PeerProc.named(f"p{i}", tmp_path, "--index", str(i), "--join", first.addr, *common)
        for i in range(1, 4)
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(alive_count(p) for p in peers) < 3:
            time.sleep(0.2)
        assert min(alive_count(p) for p in peers) == 3, "the four peers never all met"

        # A pause shorter than the suspicion timeout: never declared dead.
        paused = peers[3]
        os.kill(paused.proc.pid, signal.SIGSTOP)
        time.sleep(0.8)
        os.kill(paused.proc.pid, signal.SIGCONT)
        time.sleep(4.0)
        for p in peers[:3]:
            dead = [
                e for e in p.events if e["kind"] == "declared_dead" and e.get("subject") == "p3"
            ]
            assert not dead, f"{p.name} falsely declared p3 dead: {dead}"

        # A SIGKILL: every survivor declares the peer dead.
        victim = peers[2]
        victim.proc.kill()
        t_kill = time.monotonic()
        for p in (peers[0], peers[1], peers[3]):
            p.wait_for(
                "declared_dead",
                lambda e: e.get("subject") == "p2",
                timeout=max(1.0, 20 - (time.monotonic() - t_kill)),
            )

        out = subprocess.run(
            cli("members", "--peer", first.addr),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        states = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()[2:]}
        assert states == {"p0": "alive", "p1": "alive", "p2": "dead", "p3": "alive"}, out.stdout
        # Training went on the whole time.
        assert all(p.proc.poll() is None for p in (peers[0], peers[1], peers[3]))
    finally:
        for p in peers:
            p.kill()


def test_graceful_leave_is_announced_as_left(tmp_path):
    first = PeerProc.named("a", tmp_path, "--epochs", "10000", "--num-peers", "2")
    second = PeerProc.named(
        "b",
        tmp_path,
        "--epochs",
        "3",
        "--index",
        "1",
        "--num-peers",
        "2",
        "--join",
        first.addr,
        "--linger",
        "0",
    )
    try:
        second.wait_for("finished", timeout=120)
        assert second.proc.wait(timeout=30) == 0
        first.wait_for("left", lambda e: e.get("subject") == "b", timeout=10)
        assert not [e for e in first.events if e["kind"] == "declared_dead"]
    finally:
        first.kill()
        second.kill()
