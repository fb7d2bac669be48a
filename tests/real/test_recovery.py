"""Crash recovery with real peer processes: kill -9, resume, catch-up, bad checkpoint input.

Every peer here is a `gossip-train peer` or `gossip-train local` process on 127.0.0.1,
trained on the bundled data set with one torch thread. The peers are killed with SIGKILL,
never asked: what they leave on disk is what a crash leaves.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, cli
from peerproc import PeerProc

pytestmark = pytest.mark.real

torch.set_num_threads(1)


def peer(args: list[str], stderr: Path) -> PeerProc:
    """A `gossip-train peer` process with one torch thread (tests/real/peerproc.py)."""
    return PeerProc(["--threads", "1", *args], stderr)


Spawn = Callable[[list[str], Path], PeerProc]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start peer processes that are killed at teardown if a failed test left them running."""
    lives: list[PeerProc] = []

    def start(args: list[str], stderr: Path) -> PeerProc:
        lives.append(peer(args, stderr))
        return lives[-1]

    yield start
    for life in lives:
        life.kill()  # a no-op for one that was closed already


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ckpt_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("ckpt-*.pt"))


def check_left_behind(folder: Path) -> list[int]:
    """Every file named like a checkpoint loads with weights_only and holds its own step;
    anything else is a writer's temp file, which no loader lists. Returns the steps."""
    steps = []
    for path in ckpt_files(folder):
        raw = torch.load(path, weights_only=True)
        assert raw["step"] == int(path.stem.split("-")[1]), path
        assert raw["config"]["model"] == "mlp" and raw["model"]["1.weight"].shape == (128, 784)
        steps.append(raw["step"])
    others = {p.name for p in folder.iterdir()} - {p.name for p in ckpt_files(folder)}
    assert all(n.startswith(".ckpt-") and n.endswith(".tmp") for n in others), others
    return steps


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=True)


# ---------------------------------------------------------------- kill -9, resume


def test_sigkill_while_checkpointing_then_resume_replays_the_uninterrupted_run(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Killed four times at random moments while it writes a checkpoint after every step,
    a peer leaves only loadable checkpoints, resumes each time from the newest one under a
    higher incarnation, and ends with exactly the weights of a run that was never killed:
    same data position, same optimizer state, same RNG after every resume."""
    train = ["--epochs", "4", "--linger", "0"]
    reference = spawn([*train, "--run-dir", str(tmp_path / "ref")], tmp_path / "ref.err")
    ckdir = tmp_path / "ck"
    args = [
        *train,
        "--run-dir",
        str(tmp_path / "run"),
        "--checkpoint-dir",
        str(ckdir),
        "--checkpoint-every",
        "1",
        "--checkpoint-keep",
        "2",
    ]
    rng = random.Random(4)
    newest: int | None = None
    temps_left: set[str] = set()
    kills_mid_write = 0
    for life_no in range(4):
        life = spawn(args, tmp_path / f"life{life_no}.err")
        started = life.wait_for("started")
        resumed = life.of("resumed")
        if newest is None:
            assert resumed == []
        else:
            # The newest good file, at the same incarnation count as lives before it.
            assert resumed[0]["step"] == newest
            assert resumed[0]["checkpoint"] == str(ckdir / f"ckpt-{newest:09d}.pt")
            assert resumed[0]["incarnation"] == life_no
            assert not {p.name for p in ckdir.iterdir()} & temps_left  # cleaned at start
        assert started["steps"] == 4 * 375
        life.wait_for("progress", lambda e, floor=newest or 0: e["step"] > floor)
        time.sleep(rng.uniform(0.05, 0.5))
        assert life.kill() == -signal.SIGKILL, life.err_tail()
        steps = check_left_behind(ckdir)
        assert 1 <= len(steps) <= 2 + 1  # a kill between rename and prune leaves one extra
        temps_left = {p.name for p in ckdir.iterdir() if p.name.endswith(".tmp")}
        kills_mid_write += bool(temps_left)
        newest = max(steps)
    # A write takes several steps' time, so most kills land inside one.
    assert kills_mid_write >= 1

    last = spawn(args, tmp_path / "last.err")
    resumed = last.wait_for("resumed")
    assert (resumed["step"], resumed["incarnation"]) == (newest, 4)
    done = last.wait_for("finished")
    assert last.close(120.0) == 0, last.err_tail()
    ref = reference.wait_for("finished")
    assert reference.close(120.0) == 0, reference.err_tail()
    assert done["steps"] == ref["steps"] == 4 * 375
    assert done["samples"] == ref["samples"]
    resumed_w, ref_w = final_weights(tmp_path / "run"), final_weights(tmp_path / "ref")
    assert resumed_w.keys() == ref_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(resumed_w[name], tensor), name
    assert done["test_accuracy"] == ref["test_accuracy"]


# ---------------------------------------------------------------- catch-up under local


EPOCHS_B = 8  # 125 steps an epoch on a third of the bundled data set
KILL_AFTER_STEP = 500


def pid_writing_to(log: Path) -> int:
    """The process whose stderr is ``log``: how to find one peer of a `local` run, however
    the launcher started it (its own child or forked by a helper)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "fd" / "2")) == log:
                return int(entry.name)
        except OSError:
            continue  # gone, or not ours to look at
    raise AssertionError(f"no process writes to {log}")


def test_local_restarts_a_killed_peer_which_catches_up_and_ends_with_the_others(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    every = 50
    local = subprocess.Popen(
        cli(
            "local",
            "--peers",
            "3",
            "--epochs",
            str(EPOCHS_B),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--restart-failed",
            "--restart-delay",
            "0.2",
            "--checkpoint-every",
            str(every),
            # The others keep averaging this long after their last step: long enough for
            # the restarted peer to come back and finish among them (local forks it from a
            # preloaded process in well under a second; a fresh one imports torch for 2-8 s
            # on a busy 2-core machine).
            "--linger",
            "6",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ckdir = run_dir / "peer-1" / "checkpoints"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            steps = [int(p.stem.split("-")[1]) for p in ckpt_files(ckdir)] if ckdir.is_dir() else []
            if steps and max(steps) >= KILL_AFTER_STEP:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"peer-1 never checkpointed step {KILL_AFTER_STEP}")
        os.kill(pid_writing_to(run_dir / "peer-1" / "log.txt"), signal.SIGKILL)
        out, err = local.communicate(timeout=180)
    finally:
        if local.poll() is None:
            local.kill()
            local.communicate()
    assert local.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    peers = {p["name"]: p for p in summary["peers"]}
    assert [p["status"] for p in peers.values()] == ["finished"] * 3
    events = [e for e in summary["events"] if e.get("peer") == "peer-1"]
    kinds = [e["kind"] for e in events]
    assert kinds.count("exited") == 1 and kinds.count("restarted") == 1
    exited = next(e for e in events if e["kind"] == "exited")
    assert exited["returncode"] == -signal.SIGKILL
    # Events of the second life only (the first one caught up too, as a late starter may).
    events = events[kinds.index("restarted") :]
    kinds = kinds[kinds.index("restarted") :]
    resumed = events[kinds.index("resumed")]
    assert resumed["step"] >= KILL_AFTER_STEP and resumed["step"] % every == 0
    assert resumed["incarnation"] == 1
    caught_up = events[kinds.index("caught_up")]
    # The neighbour trained on while peer-1 was down: its weights are newer than ours.
    assert caught_up["remote_step"] > resumed["step"]
    assert kinds.index("resumed") < kinds.index("caught_up") < kinds.index("finished")

    restarted = peers["peer-1"]
    assert restarted["steps"] == EPOCHS_B * 125 and restarted["exchanges"] > 0
    others = [peers["peer-0"]["test_accuracy"], peers["peer-2"]["test_accuracy"]]
    assert abs(restarted["test_accuracy"] - sum(others) / 2) <= 0.005 + 1e-9, peers
    assert summary["consensus_test_accuracy"] >= 0.9

    # The last checkpoint holds the final weights: eval gives the accuracy the peer reported.
    newest = ckpt_files(ckdir)[-1]
    assert newest.name == f"ckpt-{EPOCHS_B * 125:09d}.pt"
    ev = subprocess.run(
        cli("eval", str(newest)), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {restarted['test_accuracy']:.4f}" in ev.stdout


# ---------------------------------------------------------------- newcomer, rejoin


def members_of(addr: str) -> dict[str, Any]:
    out = subprocess.run(
        cli("members", "--peer", addr, "--json"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return {m["name"]: m for m in json.loads(out.stdout)["members"]}


def newest_peers(ckdir: Path) -> list[str]:
    files = ckpt_files(ckdir)
    if not files:
        return []
    try:
        return list(torch.load(files[-1], weights_only=True)["peers"])
    except (OSError, RuntimeError):
        return []  # pruned between listing and loading


def test_newcomer_starts_from_the_swarm_and_a_restarted_seed_rejoins_on_its_own(
    tmp_path: Path, spawn: Spawn
) -> None:
    seed_addr = f"127.0.0.1:{free_port()}"
    new_addr = f"127.0.0.1:{free_port()}"
    ckdir = tmp_path / "seed-ck"
    common = ["--num-peers", "2", "--epochs", "400", "--linger", "0"]
    seed_args = [
        *common,
        "--name",
        "seed",
        "--index",
        "0",
        "--listen",
        seed_addr,
        "--run-dir",
        str(tmp_path / "seed"),
        "--checkpoint-dir",
        str(ckdir),
        "--checkpoint-every",
        "100",
    ]
    seed = spawn(seed_args, tmp_path / "seed.err")
    first_loss = seed.wait_for("progress")["loss"]
    assert first_loss > 2.0  # random init on 10 classes: about ln 10
    seed.wait_for("progress", lambda e: e["step"] >= 200)
    newcomer = spawn(
        [
            *common,
            "--name",
            "newcomer",
            "--index",
            "1",
            "--listen",
            new_addr,
            "--join",
            seed_addr,
            "--run-dir",
            str(tmp_path / "newcomer"),
        ],
        tmp_path / "newcomer.err",
    )
    pulled = newcomer.wait_for("caught_up")
    assert pulled["source"] == seed_addr and pulled["remote_step"] >= 200
    # Its very first step already starts from the swarm's weights, not from scratch.
    assert newcomer.wait_for("progress")["loss"] < 1.0

    # The seed was started without --join; its checkpoints remember the newcomer.
    deadline = time.monotonic() + 60
    while new_addr not in newest_peers(ckdir):
        assert time.monotonic() < deadline, "checkpoint never listed the newcomer"
        time.sleep(0.1)
    assert seed.kill() == -signal.SIGKILL
    again = spawn(seed_args, tmp_path / "seed-again.err")  # the same command line
    resumed = again.wait_for("resumed")
    assert resumed["incarnation"] == 1
    assert again.wait_for("joined")["subject"] == "newcomer"
    assert again.wait_for("caught_up")["source"] == new_addr
    again.wait_for("progress", lambda e: e["exchanges"] > 0)
    seen = members_of(new_addr)["seed"]
    assert seen["state"] == "alive" and seen["incarnation"] >= 1

    for life in (again, newcomer):
        life.proc.send_signal(signal.SIGTERM)
    for life in (again, newcomer):
        assert life.wait_for("finished")["status"] == "stopped"
        assert life.close(60.0) == 0, life.err_tail()


def test_a_peer_with_outer_steps_resumes_its_outer_weights_and_momentum(tmp_path: Path) -> None:
    """--outer-steps 50: a checkpoint between two outer steps holds the outer state (weights
    apart from the live ones, the momentum, the count), and a resumed peer goes on from it."""
    ck = tmp_path / "ck"
    args = ["--outer-steps", "50", "--checkpoint-dir", str(ck), "--checkpoint-every", "40"]
    first = peer(["--epochs", "0.5", "--run-dir", str(tmp_path / "a"), *args], tmp_path / "a.txt")
    assert first.close(120.0) == 0, first.err_tail()
    assert first.of("finished")[0]["outer_steps"] == 4  # at 50, 100, 150 and the end (188)
    mid = torch.load(ck / "ckpt-000000160.pt", weights_only=True)
    assert mid["outer"]["outer_steps"] == 3
    live = torch.cat([t.reshape(-1).float() for t in mid["model"].values()])
    assert mid["outer"]["weights"].shape == live.shape
    assert not torch.equal(mid["outer"]["weights"], live)  # 10 inner steps after the 3rd
    assert float(mid["outer"]["momentum"].norm()) > 0
    again = peer(["--epochs", "1", "--run-dir", str(tmp_path / "b"), *args], tmp_path / "b.txt")
    assert again.close(120.0) == 0, again.err_tail()
    assert again.of("resumed")[0]["step"] == 188
    assert "resumed the outer state: 4 outer steps" in again.err_tail()
    # 4 before, then at 200, 250, 300 and 350, and the end (376).
    assert again.of("finished")[0]["outer_steps"] == 9


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder from a short solo run: steps 120, 160 and 188 (the end)."""
    base = tmp_path_factory.mktemp("trained")
    life = peer(
        [
            "--epochs",
            "0.5",
            "--run-dir",
            str(base / "run"),
            "--checkpoint-dir",
            str(base / "ck"),
            "--checkpoint-every",
            "40",
        ],
        base / "err.txt",
    )
    assert life.close(120.0) == 0, life.err_tail()
    assert [p.name for p in ckpt_files(base / "ck")] == [
        "ckpt-000000120.pt",
        "ckpt-000000160.pt",
        "ckpt-000000188.pt",
    ]
    return base / "ck"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def start_peer(*args: str, wrap: list[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*(wrap or []), *cli("peer", "--threads", "1", *args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The user-facing error: exit status 2, no traceback, one `gossip-train: error:` line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gossip-train: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_bad_checkpoint_input_is_refused_by_name_and_nothing_is_overwritten(
    trained: Path, tmp_path: Path
) -> None:
    other = shutil.copytree(trained, tmp_path / "other")
    full = shutil.copytree(trained, tmp_path / "full")
    before = {"other": snapshot(other), "full": snapshot(full)}
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    # The shell's file size limit makes every write past 500 KiB fail, as a full disk
    # would; a checkpoint of the seed MLP with its Adam moments is 1.2 MB.
    limited = ["bash", "-c", 'ulimit -f 500 && exec "$@"', "bash"]
    runs = tmp_path / "runs"
    started = {  # all at once: each spends most of its time importing torch
        "other": start_peer(
            "--model",
            "cnn",
            "--num-peers",
            "2",
            "--run-dir",
            str(runs),
            "--checkpoint-dir",
            str(other),
        ),
        "file": start_peer("--run-dir", str(runs), "--checkpoint-dir", str(a_file)),
        "below": start_peer("--run-dir", str(runs), "--checkpoint-dir", str(a_file / "ck")),
        "full": start_peer("--run-dir", str(runs), "--checkpoint-dir", str(full), wrap=limited),
    }
    errors = {name: one_line_error(result(proc)) for name, proc in started.items()}
    assert errors["other"] == (
        f"gossip-train: error: checkpoint {other / 'ckpt-000000188.pt'} was written for model "
        "'mlp' and num_peers 1, this peer runs model 'cnn' and num_peers 2"
    )
    assert errors["file"] == f"gossip-train: error: checkpoint dir {a_file}: not a directory"
    assert errors["below"].startswith(
        f"gossip-train: error: checkpoint dir {a_file / 'ck'}: a parent is not a directory"
    )
    assert errors["full"] == (
        f"gossip-train: error: checkpoint dir {full}: write failed (File too large)"
    )
    assert a_file.read_text() == "not a folder"
    # No checkpoint replaced, no temp file left, nothing renamed.
    assert {"other": snapshot(other), "full": snapshot(full)} == before


def test_truncated_newest_checkpoint_is_skipped_kept_aside_and_named_by_eval(
    trained: Path, tmp_path: Path, spawn: Spawn
) -> None:
    ck = shutil.copytree(trained, tmp_path / "ck")
    newest = ck / "ckpt-000000188.pt"
    data = newest.read_bytes()
    cut = data[: len(data) // 2]
    newest.write_bytes(cut)
    loose = tmp_path / "loose.pt"
    loose.write_bytes(cut)
    life = spawn(
        ["--epochs", "0.5", "--run-dir", str(tmp_path / "run"), "--checkpoint-dir", str(ck)],
        tmp_path / "err.txt",
    )
    ev = subprocess.Popen(
        cli("eval", str(loose)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert life.wait_for("resumed")["step"] == 160
    assert life.wait_for("finished")["steps"] == 188
    assert life.close(60.0) == 0
    err = life.err_tail()
    assert f"skipping checkpoint {newest}" in err and "corrupt or truncated" in err
    # Kept for inspection under another name, out of the keep-K rotation.
    assert (ck / "ckpt-000000188.pt.corrupt").read_bytes() == cut
    assert [p.name for p in ckpt_files(ck)] == [
        "ckpt-000000120.pt",
        "ckpt-000000160.pt",
        "ckpt-000000188.pt",
    ]
    assert torch.load(newest, weights_only=True)["step"] == 188  # written by this run
    assert one_line_error(result(ev)).startswith(
        f"gossip-train: error: checkpoint {loose}: corrupt or truncated"
    )
