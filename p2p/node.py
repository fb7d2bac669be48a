"""A node: one listening address, a versioned handshake, and per-type request handlers.

Every connection starts with HELLO / HELLO_OK. The client offers the protocol versions it
speaks and its cluster name; the server answers with the highest common version or an
ERROR frame that says why, so a peer of another build or cluster gets a clear refusal.
After the handshake the server reads frames and hands each to the handler registered for
its type; a handler may keep talking on the connection (request/response conversations).
One-way messages (membership) go through a small pool of outgoing connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .framing import PROTOCOL_VERSIONS, Frame, MsgType, show, text
from .transport import Connection, Transport, TransportError

log = logging.getLogger(__name__)

FrameHandler = Callable[[Connection, Frame], Awaitable[None]]


class HandshakeError(TransportError):
    pass


@dataclass(frozen=True)
class NodeConfig:
    # Name of the swarm; peers of different clusters refuse each other at the handshake.
    cluster: str = "gossip-train"
    # Deadline for connect + HELLO. Loopback answers in well under a millisecond; a paused
    # peer's kernel still accepts the TCP connection, so this deadline is what catches it.
    handshake_timeout: float = 2.0
    # An idle incoming connection is closed after this long without a frame.
    idle_timeout: float = 120.0
    # Deadline for one one-way send (membership message) including a reconnect.
    oneway_timeout: float = 1.0
    # Most incoming connections served at once; more are closed on arrival. Each may hold
    # one frame of up to Limits.max_payload, so this bounds what strangers can make us hold.
    max_connections: int = 256


def refuse(reason: str) -> dict[str, Any]:
    return {"reason": reason}


class Node:
    def __init__(self, transport: Transport, name: str, config: NodeConfig | None = None) -> None:
        self.transport = transport
        self.name = name
        self.config = config or NodeConfig()
        self.addr = ""  # advertised address, set by start()
        self.handlers: dict[int, FrameHandler] = {}
        self._pool: dict[str, Connection] = {}
        self._pool_locks: dict[str, asyncio.Lock] = {}
        self._pool_users: dict[str, int] = {}  # sends holding or awaiting each address's lock
        self._warned: set[str] = set()
        self._serving = 0

    async def start(self, host: str, port: int, advertise: str | None = None) -> tuple[str, int]:
        bound = await self.transport.listen(host, port, self._serve)
        self.addr = advertise or f"{bound[0]}:{bound[1]}"
        return bound

    async def close(self) -> None:
        for conn in self._pool.values():
            conn.close()
        self._pool.clear()
        await self.transport.close()

    # -- server side ---------------------------------------------------------------------
    async def _serve(self, conn: Connection) -> None:
        if self._serving >= self.config.max_connections:
            self._warn_once(
                "too-many", "refusing connections beyond %d", self.config.max_connections
            )
            conn.close()
            return
        self._serving += 1
        try:
            await self._serve_one(conn)
        finally:
            self._serving -= 1

    async def _serve_one(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                hello = await conn.recv()
                if not await self._accept_hello(conn, hello):
                    return
            while True:
                async with asyncio.timeout(self.config.idle_timeout):
                    frame = await conn.recv()
                handler = self.handlers.get(frame.type)
                if handler is None:
                    self._warn_once(
                        f"type{frame.type}",
                        "ignoring unknown message type %d from %s",
                        frame.type,
                        conn.peer,
                    )
                    continue
                await handler(conn, frame)
        except TimeoutError:
            pass

    async def _accept_hello(self, conn: Connection, hello: Frame) -> bool:
        h = hello.header
        if hello.type != MsgType.HELLO:
            await conn.send(MsgType.ERROR, refuse("expected HELLO"))
            return False
        theirs = h.get("versions")
        offered = [v for v in theirs if isinstance(v, int)] if isinstance(theirs, list) else []
        common = sorted(set(PROTOCOL_VERSIONS) & set(offered))
        if not common:
            await conn.send(
                MsgType.ERROR,
                refuse(
                    f"no common protocol version: we speak {list(PROTOCOL_VERSIONS)}, "
                    f"peer {show(theirs)}"
                ),
            )
            return False
        if h.get("cluster") != self.config.cluster:
            await conn.send(
                MsgType.ERROR,
                refuse(
                    f"cluster mismatch: this peer is in {self.config.cluster!r}, "
                    f"caller in {show(h.get('cluster'))}"
                ),
            )
            return False
        await conn.send(
            MsgType.HELLO_OK, {"version": common[-1], "name": self.name, "addr": self.addr}
        )
        return True

    # -- client side ---------------------------------------------------------------------
    async def open(self, addr: str, timeout: float | None = None) -> Connection:
        """A new handshaken connection to ``addr``; raises ``TransportError`` on failure."""
        timeout = timeout or self.config.handshake_timeout
        conn = await self.transport.connect(addr, timeout)
        try:
            async with asyncio.timeout(timeout):
                await conn.send(
                    MsgType.HELLO,
                    {
                        "versions": list(PROTOCOL_VERSIONS),
                        "cluster": self.config.cluster,
                        "name": self.name,
                        "addr": self.addr,
                    },
                )
                reply = await conn.recv()
        except TimeoutError:
            conn.close()
            raise TransportError(f"{addr}: no handshake answer within {timeout:.1f} s") from None
        except TransportError:
            conn.close()
            raise
        if reply.type == MsgType.ERROR:
            conn.close()
            raise HandshakeError(f"{addr} refused us: {text(reply.header.get('reason', '?'))}")
        if reply.type != MsgType.HELLO_OK:
            conn.close()
            raise HandshakeError(f"{addr}: unexpected handshake reply type {reply.type}")
        return conn

    async def send_oneway(self, addr: str, msg_type: int, header: dict[str, Any]) -> None:
        """Best-effort one-way message through a pooled connection, within ``oneway_timeout``."""
        lock = self._pool_locks.setdefault(addr, asyncio.Lock())
        self._pool_users[addr] = self._pool_users.get(addr, 0) + 1
        try:
            async with asyncio.timeout(self.config.oneway_timeout), lock:
                conn = self._pool.get(addr)
                if conn is None or conn.closed:
                    conn = self._pool[addr] = await self.open(addr, self.config.oneway_timeout)
                await conn.send(msg_type, header)
        except (TimeoutError, TransportError, OSError) as exc:
            stale = self._pool.pop(addr, None)
            if stale is not None:
                stale.close()
            raise TransportError(f"send to {addr} failed: {exc}") from None
        finally:
            # An address is remembered while a connection to it is pooled or a send uses it,
            # no longer: every address a stranger names (SWIM answers each) would pile up.
            users = self._pool_users.pop(addr) - 1
            if users:
                self._pool_users[addr] = users
            elif addr not in self._pool:
                del self._pool_locks[addr]

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
