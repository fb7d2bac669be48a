"""An in-memory network implementing ``Transport``, with fault knobs for tests.

Frames are encoded and decoded through the real framing code, so the same limits apply.
Faults live in the network, not in the code under test:

- ``partition(a_set, b_set)``: connections across the cut stall (like a pulled cable),
  new connects across it time out; ``heal()`` restores everything.
- ``kill(addr)``: the host's connections are reset and connects are refused.
- ``pause(addr)`` / ``resume(addr)``: the host stops reading (SIGSTOP): bytes to it pile up,
  connects to it time out, nothing it would send leaves.
- ``delay``: seconds added to each frame's delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .framing import KIND_OF, Decoder, Frame, FrameError, Limits, encode
from .transport import Connection, ConnectionClosed, Handler, Stats, Transport, TransportError


class MemoryNetwork:
    def __init__(self, limits: Limits | None = None, delay: float = 0.0) -> None:
        self.limits = limits or Limits()
        self.delay = delay
        self.listeners: dict[str, MemoryTransport] = {}
        self.transports: list[MemoryTransport] = []
        self.dead: set[str] = set()
        self.paused: set[str] = set()
        self.cuts: list[tuple[frozenset[str], frozenset[str]]] = []
        self._ports = 20000

    def transport(self, host: str = "mem") -> MemoryTransport:
        tr = MemoryTransport(self, host)
        self.transports.append(tr)
        return tr

    def next_port(self) -> int:
        self._ports += 1
        return self._ports

    # -- fault knobs -----------------------------------------------------------------
    def partition(self, a: Sequence[str], b: Sequence[str]) -> None:
        self.cuts.append((frozenset(a), frozenset(b)))

    def heal(self) -> None:
        self.cuts.clear()
        self._kick()

    def _kick(self) -> None:
        for tr in self.transports:
            tr.kick()

    def kill(self, addr: str) -> None:
        self.dead.add(addr)
        tr = self.listeners.pop(addr, None)
        if tr is not None:
            tr.reset_all()

    def pause(self, addr: str) -> None:
        self.paused.add(addr)

    def resume(self, addr: str) -> None:
        self.paused.discard(addr)
        self._kick()

    def blocked(self, a: str, b: str) -> bool:
        if a in self.paused or b in self.paused:
            return True
        return any((a in x and b in y) or (a in y and b in x) for x, y in self.cuts)


class MemoryConnection(Connection):
    stats: Stats

    def __init__(self, net: MemoryNetwork, stats: Stats, local: str, peer: str) -> None:
        self.net = net
        self.stats = stats
        self.local = local
        self.peer = peer
        self.other: MemoryConnection | None = None
        self._decoder = Decoder(net.limits, counts=stats.received_by_kind)
        self._inbox: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._pending: list[bytes] = []  # bytes held back by a fault
        self._closed = False

    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None:
        if self._closed or self.other is None:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        data = b"".join(bytes(p) for p in encode(msg_type, header, segments))
        self.bytes_sent += len(data)
        self.stats.sent += len(data)
        self.stats.sent_by_kind[KIND_OF[msg_type]] += len(data)
        if self.net.delay:
            await asyncio.sleep(self.net.delay)
        self.other._arrive(data)
        # Like TCP under a stalled receiver: the sender blocks once much is in flight.
        while self.other is not None and self.other._backlog() > (4 << 20) and not self._closed:
            await asyncio.sleep(0.01)

    def _backlog(self) -> int:
        return sum(len(b) for b in self._pending)

    def _arrive(self, data: bytes) -> None:
        self._pending.append(data)
        self.flush()

    def flush(self) -> None:
        if self._closed or self.net.blocked(self.local, self.peer):
            return
        while self._pending:
            data = self._pending.pop(0)
            self.bytes_received += len(data)
            self.stats.received += len(data)
            try:
                frames = self._decoder.feed(data)
            except FrameError:
                # As over TCP: the stream cannot be resumed, the receiver drops it. The
                # sender learns it from a closed connection, not from our decoder's error.
                self._pending.clear()
                self.close()
                return
            for frame in frames:
                self._inbox.put_nowait(frame)

    async def recv(self) -> Frame:
        if self._closed and self._inbox.empty():
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        frame = await self._inbox.get()
        if frame is None:
            raise ConnectionClosed(f"connection to {self.peer} closed by peer")
        return frame

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(None)
        if self.other is not None and not self.other._closed:
            self.other.close()

    @property
    def closed(self) -> bool:
        return self._closed


class MemoryTransport(Transport):
    def __init__(self, net: MemoryNetwork, host: str) -> None:
        self.net = net
        self.host = host
        self.addr = ""
        self.stats = Stats()
        self.handler: Handler | None = None
        self.conns: set[MemoryConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def limits(self) -> Limits:
        """The network's limits: what ``Node`` decodes sealed frames under, as over TCP."""
        return self.net.limits

    async def listen(self, host: str, port: int, handler: Handler) -> tuple[str, int]:
        port = port or self.net.next_port()
        self.addr = f"{host}:{port}"
        if self.addr in self.net.listeners:
            raise TransportError(f"cannot listen on {self.addr}: address in use")
        self.net.dead.discard(self.addr)
        self.handler = handler
        self.net.listeners[self.addr] = self
        return host, port

    async def connect(self, addr: str, timeout: float) -> Connection:
        target = self.net.listeners.get(addr)
        local = self.addr or f"{self.host}:0"
        if target is None or addr in self.net.dead:
            raise TransportError(f"connect to {addr}: Connection refused")
        if self.net.blocked(local, addr):
            await asyncio.sleep(timeout)
            raise TransportError(f"connect to {addr}: no answer within {timeout:.1f} s")
        mine = MemoryConnection(self.net, self.stats, local, addr)
        theirs = MemoryConnection(self.net, target.stats, addr, local)
        mine.other, theirs.other = theirs, mine
        self._track(mine)
        target.accept(theirs)
        return mine

    def _track(self, conn: MemoryConnection) -> None:
        # Closed connections are dropped as new ones come: each holds a decoder's buffers.
        self.conns = {c for c in self.conns if not c.closed}
        self.conns.add(conn)

    def accept(self, conn: MemoryConnection) -> None:
        assert self.handler is not None
        self._track(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: MemoryConnection) -> None:
        assert self.handler is not None
        try:
            await self.handler(conn)
        except (TimeoutError, TransportError):
            pass
        finally:
            conn.close()

    def kick(self) -> None:
        for conn in list(self.conns):
            conn.flush()
            if conn.other is not None:
                conn.other.flush()

    def reset_all(self) -> None:
        for conn in list(self.conns):
            conn.close()
        for task in list(self.tasks):
            task.cancel()

    async def close(self) -> None:
        if self.net.listeners.get(self.addr) is self:
            del self.net.listeners[self.addr]
        self.reset_all()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=1.0)
