"""A pre-loaded parent that forks peer processes in milliseconds.

Importing torch costs 1.5-3 s of CPU per process; eight peers starting at once on two
cores spent over 10 s just importing. ``gossip-train local`` therefore starts one zygote
that imports torch and the trainer, loads the data set once, and then forks each peer on
request. A forked peer runs the peer entry point (``trainer.peer.main``) on the config file
the launcher wrote for it, exactly as ``gossip-train peer --config`` would, and shares the
data set's pages copy-on-write with its siblings.

The zygote has no event loop and no threads (forking those is unsafe). The launcher talks
to it over a Unix SOCK_SEQPACKET pair, one JSON message per packet; a spawn request carries
the write end of the child's event channel (a pipe) as an SCM_RIGHTS file descriptor, so the
launcher reads the child's events exactly as from a subprocess's.

    -> {"op": "spawn", "id": 3, "config": PATH, "log": PATH}      + fd (child's events)
    -> {"op": "spawn", "id": 4, "job": "summary", "run_dir": PATH, "wall": S, "log": PATH} + fd
    <- {"op": "ready"} | {"op": "error", "error": "..."}          once, after pre-loading
    <- {"op": "spawned", "id": 3, "pid": 1234}
    <- {"op": "exited", "pid": 1234, "rc": 0}     (rc is -N when killed by signal N)

When the launcher's end closes, the zygote exits; its children live on in their sessions.
If the zygote dies first, its children live on too: the launcher is their subreaper, so they
become its own children, and it watches each through a pidfd whoever its parent is.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_PACKET = 1 << 16


# -- inside the zygote ----------------------------------------------------------------------
def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _child(req: dict[str, Any], events_fd: int, sock: socket.socket) -> None:
    """In the forked child: own session, stdio to the log, run the peer, never return."""
    rc = 1
    try:
        sock.close()
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        if req.get("job") == "summary":
            from trainer.launch.summary import write

            os.close(events_fd)
            write(str(req["run_dir"]), req.get("wall"))
            rc = 0
        else:
            from trainer.peer import main

            rc = main(str(req["config"]), events_fd)
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


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def _spawn(sock: socket.socket, req: dict[str, Any], fds: list[int]) -> int | None:
    job = "run_dir" if req.get("job") == "summary" else "config"
    paths_ok = all(isinstance(req.get(k), str) for k in (job, "log"))
    if len(fds) != 1 or not paths_ok:
        for fd in fds:
            os.close(fd)
        _send(sock, {"op": "spawned", "id": req.get("id"), "pid": None, "error": "bad request"})
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(req, fds[0], sock)
    os.close(fds[0])
    _send(sock, {"op": "spawned", "id": req.get("id"), "pid": pid})
    return pid


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(sock, {"op": "exited", "pid": pid, "rc": _exit_code(status)})


def _serve(sock: socket.socket) -> None:
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sock], [], [], 0.05)
        _reap(sock, children)
        if not ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, maxfds=4)
        if not data:
            return
        req = json.loads(data)
        if req.get("op") == "spawn":
            pid = _spawn(sock, req, list(fds))
            if pid is not None:
                children.add(pid)


def _preload(dataset: str, data_dir: str | None, task: str | None = None) -> None:
    """Import torch, the trainer and the task's module; read the classifier's data set.

    A task file's import errors surface here, once, before any peer exists."""
    if task not in (None, "classifier"):
        import torch

        torch.set_num_threads(1)  # no thread pool in the parent: forking one is unsafe
        import trainer.peer  # noqa: F401 - warm the import cache for the children
        from trainer.task import load_task

        load_task(task)
        return
    # Reading and decompressing the data set is mostly zlib, which releases the GIL, and
    # importing torch is mostly not I/O: on two cores the two overlap almost fully.
    from trainer.idx import load_arrays

    read: dict[str, Any] = {}

    def reader() -> None:
        try:
            read["arrays"], _ = load_arrays(dataset, Path(data_dir) if data_dir else None)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            read["error"] = exc

    thread = threading.Thread(target=reader, name="data-reader")
    thread.start()
    import torch

    torch.set_num_threads(1)  # no thread pool in the parent: forking one is unsafe
    import trainer.loop  # noqa: F401 - warm the import cache for the children
    import trainer.peer  # noqa: F401
    from trainer.data import build_dataset, register_preloaded

    thread.join()  # no thread may outlive this: the zygote forks next
    if "error" in read:
        raise read["error"]
    register_preloaded(dataset, data_dir, build_dataset(dataset, read["arrays"]))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="gossip-train zygote (started by `local`)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data-dir")
    parser.add_argument("--task")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    sock = socket.socket(fileno=args.fd)
    try:
        _preload(args.dataset, args.data_dir, args.task)
    except Exception as exc:  # noqa: BLE001 - reported to the launcher as one line
        _send(sock, {"op": "error", "error": str(exc)})
        return
    _send(sock, {"op": "ready"})
    _serve(sock)


# -- in the launcher ----------------------------------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants (a dead zygote's children) this process's children, so it
    can collect their exit status. Linux only; False where it is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ZygoteChild:
    """The launcher's handle on a forked peer; quacks like ``asyncio.subprocess.Process``.

    Its exit status comes from the zygote while the zygote lives. Independently, a pidfd says
    when the process is gone; if the zygote has died by then, the process is the launcher's
    own child (see ``become_subreaper``), and ``waitpid`` collects its status here.
    """

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self.zygote = zygote
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
            self._loop.add_reader(self._pidfd, self._gone)
        except (OSError, AttributeError, NotImplementedError):
            self._pidfd = None  # gone already, or no pidfd: the zygote's word is all we have

    def _exited(self, rc: int) -> None:
        if self.returncode is None:
            self.returncode = rc
        self._close_pidfd()
        if not self._done.done():
            self._done.set_result(self.returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _gone(self) -> None:
        self._close_pidfd()
        self.reap()

    def reap(self) -> None:
        """Collect the exit status ourselves if the process is (now) our child."""
        if self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # The zygote's child: its "exited" message brings the status. With the zygote
            # gone and the process too, nobody ever will: it was lost with the zygote.
            if not self.zygote.alive and not pid_alive(self.pid):
                self._exited(-signal.SIGKILL)
            return
        if pid == 0:  # exiting, not yet a zombie: look again shortly
            self._loop.call_later(0.05, self.reap)
            return
        self._exited(_exit_code(status))

    async def wait(self) -> int:
        return await asyncio.shield(self._done)


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs (a zombie has ended: only its parent has not collected
    it yet)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class EventPipe:
    """The launcher's end of a child's event channel: a line reader over a pipe. ``close()``
    frees the pipe at once (a dead child's pipe must not wait for the garbage collector)."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self.reader = reader
        self.transport = transport

    @classmethod
    async def open(cls, read_fd: int) -> EventPipe:
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        return cls(reader, transport)

    async def readline(self) -> bytes:
        return await self.reader.readline()

    def close(self) -> None:
        self.transport.close()


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """Starts the zygote process and forks peers through it."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._children: dict[int, ZygoteChild] = {}
        self._early_exits: dict[int, int] = {}
        self._spawned: dict[int, asyncio.Future[int | None]] = {}
        self._next_id = 0
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.alive = False
        self.returncode: int | None = None
        # Called once when the zygote is found gone (its socket closed) while in use.
        self.on_exit: Callable[[Zygote], None] | None = None

    async def start(
        self,
        dataset: str,
        data_dir: str | None,
        task: str | None = None,
        timeout: float = 180.0,
    ) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-m",
            "trainer.launch.zygote",
            "--fd",
            str(theirs.fileno()),
            "--dataset",
            dataset,
        ]
        if data_dir:
            argv += ["--data-dir", data_dir]
        if task:
            argv += ["--task", task]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL
        )
        theirs.close()
        self.alive = True
        mine.setblocking(False)
        self._sock = mine
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reader = asyncio.create_task(self._read())
        try:
            async with asyncio.timeout(timeout):
                await self._ready
        except TimeoutError:
            await self.close()
            raise ZygoteError(f"peer launcher did not start within {timeout:.0f} s") from None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None and self._ready is not None
        while True:
            try:
                data = await loop.sock_recv(self._sock, MAX_PACKET)
            except OSError:
                data = b""
            if not data:
                break
            self._dispatch(json.loads(data))
        if not self._ready.done():
            self._ready.set_exception(ZygoteError("peer launcher exited while starting"))
        # The zygote is gone; its children are not. They are ours now (we are their
        # subreaper): each one's pidfd, or this, collects its exit status.
        self.alive = False
        for fut in self._spawned.values():
            if not fut.done():
                fut.set_exception(ZygoteError("the peer zygote exited"))
        if self.proc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    self.returncode = await self.proc.wait()
        for child in list(self._children.values()):
            child.reap()
        if self.on_exit is not None and self._sock is not None:
            self.on_exit(self)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        assert self._ready is not None
        op = msg.get("op")
        if op == "ready" and not self._ready.done():
            self._ready.set_result(None)
        elif op == "error" and not self._ready.done():
            self._ready.set_exception(ZygoteError(str(msg.get("error"))))
        elif op == "spawned":
            fut = self._spawned.pop(int(msg.get("id", -1)), None)
            if fut is not None and not fut.done():
                fut.set_result(msg.get("pid"))
        elif op == "exited":
            pid, rc = int(msg["pid"]), int(msg["rc"])
            child = self._children.get(pid)
            if child is not None:
                child._exited(rc)
            else:  # exited before spawn() registered it
                self._early_exits[pid] = rc

    async def summarize(self, run_dir: str, wall: float, log_path: str) -> int:
        """Build the run's summary (and consensus model) in a forked child, which has torch
        and the data set loaded already; its exit status."""
        job = {"job": "summary", "run_dir": run_dir, "wall": wall, "log": log_path}
        child, events = await self._fork(job)
        try:
            while await events.readline():
                pass
            return await child.wait()
        finally:
            events.close()

    async def spawn(self, config: str, log_path: str) -> tuple[ZygoteChild, EventPipe]:
        """Fork a peer running ``config``; return it and the reader of its event channel."""
        return await self._fork({"config": config, "log": log_path})

    async def _fork(self, request: dict[str, Any]) -> tuple[ZygoteChild, EventPipe]:
        if self._sock is None or not self.alive:
            raise ZygoteError("the peer zygote is not running")
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        self._next_id += 1
        req_id = self._next_id
        fut: asyncio.Future[int | None] = loop.create_future()
        self._spawned[req_id] = fut
        msg = json.dumps({"op": "spawn", "id": req_id, **request})
        try:
            self._sock.sendmsg(
                [msg.encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_fd]))],
            )
        except OSError as exc:
            os.close(read_fd)
            raise ZygoteError(f"the peer zygote is gone ({exc})") from None
        finally:
            os.close(write_fd)
        try:
            async with asyncio.timeout(30.0):
                pid = await fut
        except TimeoutError:
            os.close(read_fd)
            raise ZygoteError("the peer zygote did not answer a spawn request") from None
        if pid is None:
            os.close(read_fd)
            raise ZygoteError("peer launcher refused a spawn request")
        pipe = await EventPipe.open(read_fd)
        child = ZygoteChild(pid, self)
        self._children[pid] = child
        if pid in self._early_exits:
            child._exited(self._early_exits.pop(pid))
        return child, pipe

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.cancel()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.proc.wait()


if __name__ == "__main__":
    main()
