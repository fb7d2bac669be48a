"""The transport interface and its TCP implementation.

A transport opens and accepts *connections*; a connection sends and receives whole frames.
Membership and gossip only see this interface, so they run unchanged on real TCP and on
the in-memory network in ``p2p.memnet``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

from .framing import KIND_OF, KINDS, BufferPool, Decoder, Frame, FrameError, Kind, Limits, encode

log = logging.getLogger(__name__)


def _close(it: Iterator[Any]) -> None:
    close = getattr(it, "close", None)  # a generator's: runs its finally blocks now
    if close is not None:
        close()


class TransportError(ConnectionError):
    """A connection could not be made, or broke."""


class ConnectionClosed(TransportError):
    pass


def parse_addr(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a one-line error for anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class Stats:
    """Bytes moved by every connection of one transport (framing overhead included).

    ``sent`` and ``received`` are the totals; ``sent_by_kind`` and ``received_by_kind`` split
    the same bytes by what they were spent on (indexed by ``framing.Kind``). The reported
    kinds add up to the totals whenever no frame is half-way through (a received frame's
    bytes are counted as they arrive, a sealed record's once it is opened).
    """

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.sent_by_kind = [0] * len(Kind)
        self.received_by_kind = [0] * len(Kind)

    def by_kind(self) -> dict[str, dict[str, int]]:
        """``{"weights": {"sent": .., "received": ..}, "membership": .., "control": ..}``"""
        return {
            name: {"sent": self.sent_by_kind[k], "received": self.received_by_kind[k]}
            for k, name in enumerate(KINDS)
        }


def describe(exc: OSError) -> str:
    """A short human reason for a socket error ("Connection refused", not a repr)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class Connection(ABC):
    """One bidirectional frame stream. ``send`` honours flow control; wrap awaits in a deadline."""

    peer: str
    bytes_sent: int = 0
    bytes_received: int = 0
    # The transport's counts this connection adds to; a sealed connection over this one
    # counts its records there under the kind they carry (p2p.secure).
    stats: Stats | None = None

    @abstractmethod
    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None: ...

    async def send_produced(
        self, msg_type: int, header: dict[str, Any], buffer: Any, produce: Iterator[int]
    ) -> None:
        """Send ``buffer`` as one frame's payload while ``produce`` fills it.

        Each value ``produce`` yields is how many leading bytes of ``buffer`` are final, and
        it must end at the whole buffer. A transport may put each stretch on the wire as
        soon as it is ready (TCP does) or wait for the whole buffer (this default). The
        iterator is run to its end, or closed, before the first await.
        """
        try:
            for _ in produce:
                pass
        finally:
            _close(produce)
        await self.send(msg_type, header, [buffer])

    @abstractmethod
    async def recv(self) -> Frame: ...

    def watch_payload(self, fn: Callable[[int, memoryview, int], None] | None) -> None:
        """Report partial payloads to ``fn(frame_type, buffer, filled)`` as they arrive.

        Optional: a transport that delivers whole frames only ignores it, and the consumer
        does its work once the frame is complete. ``None`` stops the reports.
        """
        return None

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def closed(self) -> bool: ...


Handler = Callable[[Connection], Awaitable[None]]


class Transport(ABC):
    @abstractmethod
    async def listen(self, host: str, port: int, handler: Handler) -> tuple[str, int]:
        """Accept connections, calling ``handler`` for each; return the bound address."""

    @abstractmethod
    async def connect(self, addr: str, timeout: float) -> Connection: ...

    @abstractmethod
    async def close(self) -> None: ...

    stats: Stats


# A connection whose sent bytes stay unacknowledged this long is aborted by the kernel.
# Without it, a connection across a dead link (a partition, a pulled cable) lingers while TCP
# retransmits with exponential backoff, and everything queued on it waits up to ~25 s after
# the link is back; with it, the connection fails, the pool drops it, the next send redials.
USER_TIMEOUT_MS = 8000


def tune_socket(sock: socket.socket) -> None:
    options = [(socket.TCP_NODELAY, 1)]
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        options.append((socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS))
    for opt, value in options:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        except OSError:
            pass


class _FrameProtocol(asyncio.BufferedProtocol):
    """Receives straight into the decoder's buffers; queues frames; tracks flow control."""

    # Frames buffered before we stop reading from the socket (backpressure on the sender).
    MAX_QUEUED = 64

    def __init__(self, limits: Limits, stats: Stats, pool: BufferPool | None = None) -> None:
        self.decoder = Decoder(limits, pool, stats.received_by_kind)
        self.stats = stats
        self.frames: deque[Frame] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed_exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        # drain() returns only once everything written is in the kernel, so a sender may
        # reuse its buffer (a weight snapshot) as soon as send() returns.
        tr.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        self.stats.received += nbytes
        try:
            self.decoder.buffer_updated(nbytes)
        except FrameError as exc:
            log.warning("dropping connection: %s", exc)
            self.closed_exc = exc
            assert self.transport is not None
            self.transport.abort()
            return
        if self.decoder.frames:
            self.frames.extend(self.decoder.frames)
            self.decoder.frames.clear()
            if len(self.frames) >= self.MAX_QUEUED and self.transport and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_exc is None:
            self.closed_exc = exc or ConnectionClosed("connection closed by peer")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionClosed(str(self.closed_exc)))
            self._drain.exception()  # mark retrieved: the sender sees closed_exc itself

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_frame(self) -> Frame:
        while not self.frames:
            if self.closed_exc is not None:
                exc = self.closed_exc
                if isinstance(exc, TransportError):
                    raise exc
                raise ConnectionClosed(str(exc)) from exc
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frame = self.frames.popleft()
        if self._reading_paused and len(self.frames) < self.MAX_QUEUED // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return frame

    async def drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            await self._drain


# Bytes handed to the socket at a time. A write the kernel cannot take at once is copied
# into the event loop's buffer: written whole, a 40 MB payload to a slow reader meant a
# second 40 MB copy; in pieces, at most one piece waits there while we wait for it to drain.
WRITE_PIECE = 1 << 20


def _bytes_view(part: Any) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class TcpConnection(Connection):
    def __init__(self, proto: _FrameProtocol, peer: str) -> None:
        self._proto = proto
        self.peer = peer
        self.stats = proto.stats
        # A frame goes out in pieces with waits between them: one sender at a time, or two
        # frames' pieces would interleave.
        self._sending = asyncio.Lock()

    async def _write_rest(self, tr: asyncio.Transport, view: memoryview, start: int = 0) -> None:
        for at in range(start, view.nbytes, WRITE_PIECE):
            tr.write(view[at : at + WRITE_PIECE])
            if tr.get_write_buffer_size() > 0:
                await self._proto.drain()
            if tr.is_closing() or self._proto.closed_exc is not None:
                raise ConnectionClosed(f"connection to {self.peer} closed while sending")

    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None:
        tr = self._proto.transport
        if tr is None or tr.is_closing() or self._proto.closed_exc is not None:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        parts = encode(msg_type, header, segments)
        n = sum(memoryview(p).nbytes for p in parts)
        async with self._sending:
            if n <= WRITE_PIECE:
                tr.writelines(parts)
            else:
                try:
                    for part in parts:
                        await self._write_rest(tr, _bytes_view(part))
                except BaseException:
                    tr.abort()  # part of a frame is out: the stream cannot be resumed
                    raise
            self.bytes_sent += n
            self._proto.stats.sent += n
            self._proto.stats.sent_by_kind[KIND_OF[msg_type]] += n
            await self._proto.drain()

    async def send_produced(
        self, msg_type: int, header: dict[str, Any], buffer: Any, produce: Iterator[int]
    ) -> None:
        tr = self._proto.transport
        if tr is None or tr.is_closing() or self._proto.closed_exc is not None:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        head, view = encode(msg_type, header, [buffer])
        n = len(head) + view.nbytes
        async with self._sending:
            tr.write(head)
            sent = produced = 0
            try:
                for ready in produce:
                    produced = ready
                    # Out while the next stretch is produced, as long as the kernel keeps
                    # up; what it cannot take yet stays in ``buffer`` and goes below.
                    if ready > sent and tr.get_write_buffer_size() <= WRITE_PIECE:
                        tr.write(view[sent:ready])
                        sent = ready
            except BaseException:
                tr.abort()  # part of a frame is out: the stream cannot be resumed
                raise
            finally:
                _close(produce)
            if produced != view.nbytes:
                tr.abort()  # the frame's length is promised; a short frame must not go out
                raise ConnectionClosed(f"produced {produced} of {view.nbytes} payload bytes")
            try:
                await self._write_rest(tr, view, sent)
            except BaseException:
                tr.abort()
                raise
            self.bytes_sent += n
            self._proto.stats.sent += n
            self._proto.stats.sent_by_kind[KIND_OF[msg_type]] += n
            await self._proto.drain()

    async def recv(self) -> Frame:
        frame = await self._proto.next_frame()
        self.bytes_received = self._proto.received
        return frame

    def watch_payload(self, fn: Callable[[int, memoryview, int], None] | None) -> None:
        self._proto.decoder.progress = fn
        self._proto.decoder.report_progress()

    def close(self) -> None:
        tr = self._proto.transport
        if tr is not None and not tr.is_closing():
            tr.close()

    def abort(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.abort()

    @property
    def closed(self) -> bool:
        tr = self._proto.transport
        return tr is None or tr.is_closing() or self._proto.closed_exc is not None


class TcpTransport(Transport):
    """Real TCP through asyncio (uvloop when installed), with ``BufferedProtocol`` receives."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.stats = Stats()
        self.pool = BufferPool()
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int, handler: Handler) -> tuple[str, int]:
        loop = asyncio.get_running_loop()

        def factory() -> _FrameProtocol:
            proto = _FrameProtocol(self.limits, self.stats, self.pool)
            proto_made = proto.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                proto_made(transport)
                peer = transport.get_extra_info("peername")
                conn = TcpConnection(proto, f"{peer[0]}:{peer[1]}" if peer else "?")
                task = loop.create_task(self._serve(handler, conn))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)

            proto.connection_made = made  # type: ignore[method-assign]
            return proto

        try:
            self._server = await loop.create_server(
                factory, host, port, reuse_address=True, backlog=256
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {describe(exc)}") from None
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    @staticmethod
    async def _serve(handler: Handler, conn: TcpConnection) -> None:
        try:
            await handler(conn)
        except (TimeoutError, TransportError, OSError):
            pass
        except Exception:
            log.exception("connection handler for %s failed", conn.peer)
        finally:
            conn.close()

    async def connect(self, addr: str, timeout: float) -> Connection:
        host, port = parse_addr(addr)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: _FrameProtocol(self.limits, self.stats, self.pool), host, port
                )
        except TimeoutError:
            raise TransportError(f"connect to {addr}: no answer within {timeout:.1f} s") from None
        except OSError as exc:
            raise TransportError(f"connect to {addr}: {describe(exc)}") from None
        return TcpConnection(proto, addr)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)
