"""Checkpoints of real writer processes killed with SIGKILL at random moments and mid-write."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ck
from trainer.checkpoint import CheckpointStore

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).resolve().parent / "helpers_ckpt_writer.py"

torch.set_num_threads(1)


class Forker:
    """Talks to tests/real/helpers_ckpt_writer.py, which forks writer processes on request."""

    def __init__(self, err_path: Path) -> None:
        self.err_path = err_path
        self._err = open(err_path, "wb")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        assert self._read(60.0) == "ready"

    def _read(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        assert line, f"writer helper silent; stderr: {self.err_path.read_text()!r}"
        return line

    def ask(self, command: str, timeout: float = 30.0) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return int(self._read(timeout))

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.stdout.close()
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)
        self._err.close()


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forker]:
    f = Forker(tmp_path_factory.mktemp("forker") / "stderr.txt")
    yield f
    f.close()


def check_files(folder: Path) -> list[int]:
    """Every finished checkpoint loads with weights_only and holds the step of its name."""
    steps = []
    for path in sorted(folder.glob("ckpt-*.pt")):
        raw = torch.load(path, weights_only=True)
        step = ck._step_of(path)
        assert raw["step"] == step, path
        assert torch.equal(raw["data"]["marker"], torch.full_like(raw["data"]["marker"], step))
        steps.append(step)
    return steps


def test_sigkill_at_random_moments_never_leaves_a_bad_checkpoint(
    tmp_path: Path, forker: Forker
) -> None:
    rng = random.Random(20261127)
    kills = 15
    for _ in range(kills):
        pid = forker.ask(f"spawn {tmp_path} loop")
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        # -9 proves the writer was alive and writing when killed, not dead of an error.
        assert forker.ask(f"reap {pid}") == -signal.SIGKILL, forker.err_path.read_text()
        # A kill between rename and prune can leave one extra file until the next save.
        assert len(check_files(tmp_path)) <= 3 + 1
    store = CheckpointStore(tmp_path, keep=3)
    assert not list(tmp_path.glob(".ckpt-*.tmp"))
    found = store.latest()
    assert found is not None
    ckpt, path = found
    assert ckpt["step"] == max(check_files(tmp_path)) and path == store.list()[-1]
    assert ckpt["config"]["model"] == "writer-mlp"


@pytest.mark.parametrize("mode", ["die-write 2 1000000", "die-replace 2"])
def test_kill_mid_write_leaves_temp_only(
    tmp_path: Path, forker: Forker, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    pid = forker.ask(f"spawn {tmp_path} {mode}")
    assert forker.ask(f"reap {pid}") == -signal.SIGKILL, forker.err_path.read_text()
    temps = list(tmp_path.glob(".ckpt-000000002.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size >= 1_000_000
    assert check_files(tmp_path) == [0, 1]
    store = CheckpointStore(tmp_path)  # a restarted peer
    assert not temps[0].exists()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        found = store.latest()
    assert found is not None and found[0]["step"] == 1
    assert caplog.records == []
