"""A pre-loaded parent that forks peer processes in milliseconds.

Importing torch costs 1.5-3 s of CPU per process; eight peers starting at once on two
cores spent over 10 s just importing. ``gossip-train local`` therefore starts one zygote
that imports torch and the trainer, loads the data set once, and then forks each peer on
request. A forked peer runs exactly ``gossip-train peer`` (``trainer.cli.main``) and
shares the data set's pages copy-on-write with its siblings.

The zygote has no event loop and no threads (forking those is unsafe). It speaks JSON
lines: requests on stdin, replies on stdout.

    -> {"op": "spawn", "id": 3, "argv": [...], "stdout": PATH, "stderr": PATH}
    <- {"op": "ready"}                       once pre-loading is done
    <- {"op": "spawned", "id": 3, "pid": 1234}
    <- {"op": "exited", "pid": 1234, "rc": 0}   (rc is -N when killed by signal N)

When stdin closes the zygote exits; its children live on in their own sessions.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback
from typing import Any


def _reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _child(req: dict[str, Any]) -> None:
    """In the forked child: become a session leader, rewire stdio, run the peer, exit."""
    rc = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        from trainer.cli import main

        rc = main(req["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _spawn(req: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(req)
    _reply({"op": "spawned", "id": req.get("id"), "pid": pid})
    return pid


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _reply({"op": "exited", "pid": pid, "rc": _exit_code(status)})


def preload(dataset: str, data_dir: str | None) -> None:
    import torch

    torch.set_num_threads(1)  # no thread pool in the parent: forking one is unsafe
    import trainer.cli  # noqa: F401 - warm the import cache for the children
    import trainer.peer  # noqa: F401
    from trainer.loop import preload_dataset

    preload_dataset(dataset, data_dir)


def serve() -> None:
    children: set[int] = set()
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        _reap(children)
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            if req.get("op") == "spawn":
                children.add(_spawn(req))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    try:
        preload(args.dataset, args.data_dir)
    except Exception as exc:  # noqa: BLE001 - reported to the launcher as one line
        _reply({"op": "error", "error": str(exc)})
        return
    _reply({"op": "ready"})
    serve()


if __name__ == "__main__":
    main()
