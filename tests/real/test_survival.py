"""No process of a run takes the others down: kill -9 the zygote, or the launcher, mid-run,
and every peer that was not killed still finishes, writes its final model, and leaves its
work in its events file, from which `gossip-train summary` rebuilds the run's summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli

from gossip.events import Channel, read_events

pytestmark = pytest.mark.real

STEPS = "5000"  # mid-run on a loaded machine: each test strikes as soon as training starts


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_training(run_dir: Path, peers: int, timeout: float = 120.0) -> None:
    """Until every peer has reported progress past its first steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = []
        for i in range(peers):
            evs = read_events(run_dir / f"peer-{i}" / "events.jsonl")
            steps.append(max((e.get("step", 0) for e in evs if e["kind"] == "progress"), default=0))
        if all(s > 200 for s in steps):
            return
        time.sleep(0.2)
    raise AssertionError(f"peers did not start training within {timeout} s")


def _launch(run_dir: Path, peers: int, *extra: str) -> subprocess.Popen[bytes]:
    """The launcher, its output to files (its children inherit nothing that we wait on)."""
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / "launcher.log", "wb") as log:
        return subprocess.Popen(
            cli(
                "local", "--peers", str(peers), "--steps", STEPS, "--run-dir", str(run_dir),
                "--no-progress", "--checkpoints", "--checkpoint-seconds", "1", *extra,
            ),
            cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _launcher_log(run_dir: Path) -> str:
    return (run_dir.parent / "launcher.log").read_text(errors="replace")


def _finished_in_events(run_dir: Path, name: str) -> dict:
    evs = read_events(run_dir / name / "events.jsonl")
    done = [e for e in evs if e["kind"] == "finished"]
    assert done, f"{name}: no 'finished' event; last: {evs[-1] if evs else None}"
    return done[-1]


def _rebuilt_summary(run_dir: Path) -> dict:
    (run_dir / "summary.json").unlink(missing_ok=True)
    proc = subprocess.run(
        cli("summary", str(run_dir)), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((run_dir / "summary.json").read_text())


def test_killing_the_zygote_mid_run_leaves_every_peer_running(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = _launch(run_dir, 3)
    try:
        _wait_training(run_dir, 3)
        zygotes = [p for p in _children(launcher.pid) if "trainer.launch.zygote" in _cmdline(p)]
        assert len(zygotes) == 1, [(p, _cmdline(p)) for p in _children(launcher.pid)]
        os.kill(zygotes[0], signal.SIGKILL)
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, _launcher_log(run_dir)[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["status"] for p in summary["peers"]] == ["finished"] * 3, summary["peers"]
    for p in summary["peers"]:
        assert int(p["steps"]) == int(STEPS) and Path(p["final_model"]).is_file()
        assert _finished_in_events(run_dir, p["name"])["steps"] == int(STEPS)
    kinds = [e["kind"] for e in summary["events"]]
    assert "zygote_exited" in kinds
    assert summary["consensus_model"] and Path(summary["consensus_model"]).is_file()
    rebuilt = _rebuilt_summary(run_dir)
    assert [p["status"] for p in rebuilt["peers"]] == ["finished"] * 3
    assert [p["steps"] for p in rebuilt["peers"]] == [p["steps"] for p in summary["peers"]]


def test_killing_the_launcher_mid_run_lets_the_peers_finish(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = _launch(run_dir, 3)
    peer_pids: list[int] = []
    try:
        _wait_training(run_dir, 3)
        info = json.loads((run_dir / "peers.json").read_text())
        peer_pids = [p["pid"] for p in info["peers"]]
        assert all(peer_pids), info
        launcher.kill()  # SIGKILL, the launcher alone: peers are in sessions of their own
        launcher.wait(timeout=30)
        # The peers notice nothing but a closed event channel: they train on and finish.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(_alive(pid) for pid in peer_pids):
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in peer_pids), "peers still running after 300 s"
    finally:
        for pid in peer_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert not (run_dir / "summary.json").exists()  # the launcher died before writing it
    for i in range(3):
        done = _finished_in_events(run_dir, f"peer-{i}")
        assert done["steps"] == int(STEPS) and Path(done["final_model"]).is_file()
        assert list((run_dir / f"peer-{i}" / "checkpoints").glob("ckpt-*.pt"))
        log = (run_dir / f"peer-{i}" / "log.txt").read_text()
        assert "event channel closed" in log
    summary = _rebuilt_summary(run_dir)
    assert [p["status"] for p in summary["peers"]] == ["finished"] * 3
    assert summary["consensus_metrics"]["accuracy"] > 0.8


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_peer_whose_event_channel_breaks_keeps_training(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the watcher is gone before the peer even starts
    try:
        proc = subprocess.run(
            cli(
                "peer", "--run-dir", str(tmp_path), "--steps", "300",
                "--events-fd", str(write_fd),
            ),
            cwd=ROOT, capture_output=True, text=True, timeout=120, pass_fds=(write_fd,),
        )  # fmt: skip
    finally:
        os.close(write_fd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "event channel closed" in proc.stderr
    done = _finished_in_events(tmp_path, ".")
    assert done["steps"] == 300 and (tmp_path / "final.pt").is_file()


def test_a_channel_nobody_reads_never_blocks_and_keeps_lines_whole() -> None:
    read_fd, write_fd = os.pipe()
    try:
        channel = Channel(write_fd, backlog=1 << 16)
        t0 = time.monotonic()
        for i in range(20_000):  # far more than a pipe holds
            channel({"kind": "progress", "step": i, "pad": "x" * 100})
        assert time.monotonic() - t0 < 60  # it returned at all: a blocking write never would
        assert channel.dropped > 0 and not channel.broken
        os.set_blocking(read_fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        # What arrived is a run of whole events, in order (a partly written one is finished
        # with the next event, never cut or interleaved).
        channel({"kind": "last", "step": -1})
        while True:
            try:
                data += os.read(read_fd, 1 << 16)
            except BlockingIOError:
                break
        lines = data.decode().splitlines()
        events = [json.loads(line) for line in lines]
        steps = [e["step"] for e in events if e["kind"] == "progress"]
        assert steps == sorted(steps) and steps[0] == 0 and events[-1]["kind"] == "last"
    finally:
        os.close(read_fd)
        os.close(write_fd)


FAILS_AT = """
from torch import nn
from trainer.tasks import classifier

DEFAULTS = {"steps": 400}
seen = {"peer": None, "calls": 0}


def model():
    return classifier.model()


def data(peer, peers, seed=0):
    seen["peer"] = peer
    return classifier.data(peer, peers, seed=seed)


def loss(model, batch):
    seen["calls"] += 1
    if seen["peer"] == 1 and seen["calls"] == 120:
        raise RuntimeError("boom in the user's loss at call 120")
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
"""


def test_a_failed_peer_keeps_its_work_and_its_exception_in_the_summary(tmp_path: Path) -> None:
    task = tmp_path / "fails.py"
    task.write_text(FAILS_AT)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli("local", "--peers", "2", "--task", str(task), "--run-dir", str(run_dir),
            "--no-progress", "--linger", "5"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ok, failed = summary["peers"]
    assert ok["status"] == "finished" and ok["steps"] == 400
    assert failed["status"] == "failed"
    assert failed["error"] == "boom in the user's loss at call 120"
    assert failed["steps"] == 119  # the steps it completed before the failing one
    assert failed["exchanges"] is not None and failed["samples"] == 119 * 32
    assert "boom in the user's loss at call 120" in proc.stderr
