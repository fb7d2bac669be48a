"""Checkpoint writer processes for the kill tests in test_checkpoint_kill.py.

Importing torch takes about two seconds here, which would make fifteen restarts slower
than the test budget, so this script imports it once and forks one writer process per
request. Each writer is a real process that the test kills with SIGKILL.

Usage: python tests/real/helpers_ckpt_writer.py
It answers "ready", then takes one command per line on stdin, one answer line on stdout:
  spawn DIR loop                   -> PID  writer saving checkpoints into DIR, fast as it can
  spawn DIR die-write SAVES BYTES  -> PID  writer that kills itself after BYTES bytes of the
                                           write that follows SAVES complete saves
  spawn DIR die-replace SAVES      -> PID  same, killed just before the rename
  reap PID                         -> exit code (negative signal number when killed)
EOF or "quit" kills the remaining writers and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointStore, build_checkpoint, snapshot_model_optimizer

KEEP = 3
MARKER_LEN = 65536  # int64 marker tensor, 512 KiB, holds the step in every element
CONFIG = {"model": "writer-mlp", "dataset": "random", "partition": "iid", "seed": 7}
MAX_SECONDS = 60.0  # a writer whose test died stops on its own


def _model_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """About 5 MB of weights and Adam moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 784)).sum().backward()
    optimizer.step()
    return snapshot_model_optimizer(model, optimizer)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(mode: str, nbytes: int) -> None:
    """Make this process kill itself inside the next checkpoint write."""
    if mode == "die-replace":
        os.replace = lambda *a, **k: _die()  # type: ignore[assignment]
        return
    real_write = os.write
    written = 0

    def write(fd: int, data: Any) -> int:
        nonlocal written
        n = real_write(fd, data)
        written += n
        if written >= nbytes:
            _die()
        return n

    os.write = write  # type: ignore[assignment]


def _writer(
    state: tuple[dict[str, torch.Tensor], dict[str, Any]],
    directory: Path,
    mode: str,
    saves: int,
    nbytes: int,
) -> None:
    parent = os.getppid()
    store = CheckpointStore(directory, keep=KEEP)
    found = store.latest()
    step = found[0]["step"] + 1 if found else 0
    weights, optim = state
    deadline = time.monotonic() + MAX_SECONDS
    done = 0
    while os.getppid() == parent and time.monotonic() < deadline:
        if done == saves and mode != "loop":
            _arm(mode, nbytes)
        data = {"cursor": step, "marker": torch.full((MARKER_LEN,), step, dtype=torch.int64)}
        ckpt = build_checkpoint(model=weights, optimizer=optim, step=step, data=data, config=CONFIG)
        store.save(ckpt)
        step += 1
        done += 1


def _spawn(state: tuple[dict[str, torch.Tensor], dict[str, Any]], args: list[str]) -> int:
    directory = Path(args[0])
    mode = args[1]
    saves = int(args[2]) if len(args) > 2 else -1
    nbytes = int(args[3]) if len(args) > 3 else 0
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        _writer(state, directory, mode, saves, nbytes)
    except BaseException as exc:  # report and leave without running the parent's cleanup
        print(f"writer {os.getpid()} failed: {exc!r}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def main() -> None:
    torch.set_num_threads(1)
    # Built once here: the first Adam costs about a second of imports, which every
    # forked writer would otherwise pay before its first save.
    state = _model_state()
    children: set[int] = set()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "spawn":
            pid = _spawn(state, args)
            children.add(pid)
            print(pid, flush=True)
        elif cmd == "reap":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            print(os.waitstatus_to_exitcode(status), flush=True)
        elif cmd == "quit":
            break
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
