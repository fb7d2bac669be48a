"""A node: one listening address, a versioned handshake, and per-type request handlers.

Every connection starts with HELLO / HELLO_OK. The client offers the protocol versions it
speaks and its cluster name; the server answers with the highest common version or an
ERROR frame that says why, so a peer of another build or cluster gets a clear refusal.
With a keyring (``NodeConfig.keyring``) the connection first proves that both ends hold the
swarm's secret and is sealed from then on (``p2p.secure``); the HELLO goes sealed too, and an
unauthenticated caller learns nothing but "authentication failed".
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

from .framing import PROTOCOL_VERSIONS, Frame, Limits, MsgType, show, text
from .secure import (
    AUTH_FAILED,
    AuthError,
    Keyring,
    SealedConnection,
    client_hello,
    client_verify,
    server_challenge,
    server_verify,
)
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
    # The swarm's secrets (p2p.secure): None accepts anyone who knows the cluster name.
    keyring: Keyring | None = None


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
        # Why the last connection to an address failed authentication (for error messages).
        self.auth_failures: dict[str, str] = {}
        self.refused_callers = 0  # callers that failed authentication

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
                if self.config.keyring is not None:
                    sealed = await self._authenticate(conn, hello)
                    if sealed is None:
                        return
                    conn = sealed
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

    def _limits(self) -> Limits:
        limits = getattr(self.transport, "limits", None)
        return limits if isinstance(limits, Limits) else Limits()

    async def _authenticate(self, conn: Connection, hello: Frame) -> Connection | None:
        """The server's side of the challenge-response; the sealed connection, or None
        (the caller was told "authentication failed" and nothing else)."""
        assert self.config.keyring is not None
        try:
            if hello.type != MsgType.HELLO:
                raise AuthError(AUTH_FAILED)
            challenge, state = server_challenge(self.config.keyring, hello.header)
            await conn.send(MsgType.AUTH, challenge)
            answer = await conn.recv()
            if answer.type != MsgType.AUTH:
                raise AuthError(AUTH_FAILED)
            send, recv = server_verify(state, answer.header)
        except AuthError:
            self.refused_callers += 1
            self._warn_once(
                "auth", "refused a caller from %s: authentication failed (later ones: debug)",
                conn.peer,
            )  # fmt: skip
            log.debug("refused a caller from %s: authentication failed", conn.peer)
            try:
                await conn.send(MsgType.ERROR, refuse(AUTH_FAILED))
            finally:
                conn.close()
            return None
        return SealedConnection(conn, send, recv, self._limits())

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
            # Say which cluster the caller named, never ours: a stranger learns nothing.
            await conn.send(
                MsgType.ERROR,
                refuse(
                    f"cluster mismatch: this peer is not in the caller's {show(h.get('cluster'))}"
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
                if self.config.keyring is not None:
                    conn = await self._prove(conn, addr)
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
        except AuthError as exc:
            conn.close()
            self.auth_failures[addr] = str(exc)
            raise AuthError(f"{addr}: {exc}") from None
        except TransportError:
            conn.close()
            raise
        if reply.type == MsgType.ERROR:
            conn.close()
            reason = text(reply.header.get("reason", "?"))
            if reason == AUTH_FAILED:  # the peer has a secret and we do not
                reason = f"{AUTH_FAILED}: the peer needs the swarm's secret (--secret-file)"
                self.auth_failures[addr] = reason
                raise AuthError(f"{addr}: {reason}")
            raise HandshakeError(f"{addr} refused us: {reason}")
        if reply.type != MsgType.HELLO_OK:
            conn.close()
            raise HandshakeError(f"{addr}: unexpected handshake reply type {reply.type}")
        return conn

    async def _prove(self, conn: Connection, addr: str) -> Connection:
        """The caller's side of the challenge-response; the sealed connection."""
        assert self.config.keyring is not None
        opening, state = client_hello(self.config.keyring, self.name)
        await conn.send(MsgType.HELLO, {"versions": list(PROTOCOL_VERSIONS), **opening})
        reply = await conn.recv()
        if reply.type == MsgType.ERROR:
            reason = text(reply.header.get("reason", AUTH_FAILED), 200)
            if reason != AUTH_FAILED:  # a peer without a secret read our opening as a HELLO
                reason = f"{AUTH_FAILED}: the peer does not use a secret ({reason})"
            raise AuthError(reason)
        if reply.type != MsgType.AUTH:
            raise AuthError(f"{AUTH_FAILED}: the peer does not use a secret")
        proof, (send, recv) = client_verify(self.config.keyring, state, reply.header)
        await conn.send(MsgType.AUTH, proof)
        return SealedConnection(conn, send, recv, self._limits())

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
