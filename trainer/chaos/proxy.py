"""The fault-injecting TCP proxy: mode "proxy" of the chaos networks (no privileges)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2p.framing import Decoder, Frame, FrameError, Limits, MsgType
from p2p.secure import Keyring, member_tag
from p2p.transport import parse_addr

from .netns import FaultNet, parse_rate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyConfig:
    # Largest HELLO header the proxy reads to learn the caller (real ones are ~100 bytes).
    max_hello: int = 64 * 1024
    # Deadline for the caller's HELLO and for connecting to the peer behind the proxy.
    connect_timeout: float = 5.0
    # A connection that moves no byte for this long (frozen by a partition included) is
    # closed. Peers close idle connections after 120 s themselves.
    idle_timeout: float = 180.0
    # Bytes read per chunk; also the granularity of the bandwidth cap.
    chunk: int = 64 * 1024


class Bucket:
    """A token bucket in virtual time: a send of n bytes waits until the rate allows it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.ready = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.ready = max(self.ready, now) + n / self.rate
        # A burst of up to one chunk passes at once, as with tbf's bucket.
        wait = self.ready - now - 64 * 1024 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(eq=False)
class _Link:
    caller: int | None  # peer index of the caller, None for tools (CLI, chaos)
    callee: int
    writers: list[asyncio.StreamWriter]


class ProxyNet(FaultNet):
    """One proxy per peer, in this process's event loop. ``await start()``, then ``close()``."""

    mode = "proxy"

    def __init__(
        self,
        names: list[str],
        upstreams: list[str],
        config: ProxyConfig | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.names = names
        # With a secret the opening names nobody in the clear; its member tag does, for us.
        self.tags = {
            member_tag(key, name): i
            for key in (keyring.keys if keyring else ())
            for i, name in enumerate(names)
        }
        self.upstreams = upstreams
        self.config = config or ProxyConfig()
        self.fronts: list[str] = []
        self.group: dict[int, int] | None = None
        self.up: dict[int, Bucket] = {}
        self.down: dict[int, Bucket] = {}
        self.links: set[_Link] = set()
        self._changed = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> list[str]:
        for i in range(len(self.upstreams)):
            server = await asyncio.start_server(self._acceptor(i), host, 0)
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.fronts.append(f"{host}:{port}")
        return self.fronts

    def _acceptor(self, i: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._spawn(self._serve(i, reader, writer))

        return accept

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "fronts": self.fronts, "upstreams": self.upstreams}

    # -- faults ------------------------------------------------------------------------------
    def partition(self, groups: list[list[int]]) -> None:
        self.group = {i: g for g, members in enumerate(groups) for i in members}
        self._wake()

    def heal(self) -> None:
        self.group = None
        self._wake()

    def cap(self, index: int, rate: str) -> None:
        bps = parse_rate(rate)
        self.up[index], self.down[index] = Bucket(bps), Bucket(bps)

    def uncap(self, index: int) -> None:
        self.up.pop(index, None)
        self.down.pop(index, None)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def cut(self, link: _Link) -> bool:
        if self.group is None or link.caller is None:
            return False
        return self.group.get(link.caller) != self.group.get(link.callee)

    # -- forwarding --------------------------------------------------------------------------
    async def _serve(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        link = _Link(None, i, [writer])
        self.links.add(link)
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                hello, link.caller = await self._read_hello(reader)
            await self._hold(link)
            host, port = parse_addr(self.upstreams[i])
            async with asyncio.timeout(self.config.connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(host, port)
            link.writers.append(up_writer)
            up_writer.write(hello)
            await self._pipe(link, reader, up_writer, up_reader, writer)
        except (TimeoutError, OSError, EOFError, ValueError, FrameError) as exc:
            log.debug("proxy for %s: connection ends: %s", self.names[i], exc)
        finally:
            self.links.discard(link)
            for w in link.writers:
                w.close()

    async def _read_hello(self, reader: asyncio.StreamReader) -> tuple[bytes, int | None]:
        """The caller's first frame (a HELLO), passed on unchanged; and who sent it.

        Decoded by ``p2p.framing``'s own decoder with the proxy's limits (a HELLO has no
        payload), reading exactly the frame's bytes so nothing after it is consumed here."""
        decoder = Decoder(Limits(max_header=self.config.max_hello, max_payload=0))
        raw = bytearray()
        frames: list[Frame] = []
        while not frames:
            chunk = await reader.readexactly(decoder.needed)
            raw += chunk
            frames = decoder.feed(chunk)
        frame = frames[0]
        caller = None
        if frame.type == MsgType.HELLO:
            name, tag = frame.header.get("name"), frame.header.get("tag")
            if isinstance(tag, str) and tag in self.tags:
                caller = self.tags[tag]
            elif isinstance(name, str) and name in self.names:
                caller = self.names.index(name)
        return bytes(raw), caller

    async def _hold(self, link: _Link) -> None:
        """While a partition cuts this link, no byte moves (until the idle deadline)."""
        async with asyncio.timeout(self.config.idle_timeout):
            while self.cut(link):
                await self._changed.wait()

    async def _pipe(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        caller, callee = link.caller, link.callee
        forward = self._pump(link, reader, up_writer, caller, callee)
        backward = self._pump(link, up_reader, writer, callee, caller)
        tasks = [asyncio.ensure_future(forward), asyncio.ensure_future(backward)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        src: int | None,
        dst: int | None,
    ) -> None:
        while True:
            async with asyncio.timeout(self.config.idle_timeout):
                data = await reader.read(self.config.chunk)
            if not data:
                return
            await self._hold(link)
            for bucket in self._buckets(src, dst):
                await bucket.take(len(data))
            writer.write(data)
            async with asyncio.timeout(self.config.idle_timeout):
                await writer.drain()

    def _buckets(self, src: int | None, dst: int | None) -> list[Bucket]:
        up = self.up.get(src) if src is not None else None
        down = self.down.get(dst) if dst is not None else None
        return [b for b in (up, down) if b is not None]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()
