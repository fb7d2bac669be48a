"""The exchange over real TCP sockets on 127.0.0.1, and garbage thrown at a real port."""

import asyncio
import socket

import numpy as np
import pytest

from gossip.exchange import Exchanger
from gossip.store import ArrayStore
from p2p.framing import MAGIC, PREFIX, Limits, MsgType
from p2p.node import Node
from p2p.transport import TcpTransport, TransportError


async def tcp_peer(name, size, seed, limits=None):
    """A peer over TCP whose weights share a start with every other (seed 0) and differ by
    a little noise of their own (``seed``), as a swarm's do: robust mixing accepts them."""
    node = Node(TcpTransport(limits), name)
    await node.start("127.0.0.1", 0)
    start = np.random.default_rng(0).normal(size=size)
    store = ArrayStore(start + 0.1 * np.random.default_rng(seed).normal(size=size))
    return node, store, Exchanger(node, store)


async def averaged_over_tcp(size, before_exchange=None):
    """Two TCP peers of ``size`` floats; a exchanges with b; both must end at the mean.

    Returns a's Outcome. ``before_exchange(sa, sb)`` runs just before the exchange starts.
    """
    a, sa, xa = await tcp_peer("a", size, 1)
    b, sb, xb = await tcp_peer("b", size, 2)
    try:
        expect = (sa.weights + sb.weights) / 2
        if before_exchange is not None:
            before_exchange(sa, sb)
        out = await xa.exchange(b.addr)
        assert out.ok, out.reason
        for _ in range(200):
            if xb.exchanges:
                break
            await asyncio.sleep(0.01)
        np.testing.assert_allclose(sa.weights, expect, atol=1e-6)
        np.testing.assert_allclose(sb.weights, expect, atol=1e-6)
        assert a.transport.stats.sent > 4 * size and a.transport.stats.received > 4 * size
        return out
    finally:
        await a.close()
        await b.close()


async def test_push_pull_over_tcp_large_vector():
    await averaged_over_tcp(1_000_000)


async def raw_send(addr, data):
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(2):
            rest = await reader.read()
    except (TimeoutError, ConnectionError):
        rest = b""
    writer.close()
    return rest


async def test_garbage_on_the_port_never_hurts_the_peer():
    b, sb, xb = await tcp_peer("b", 1000, 2, Limits(max_payload=1 << 20))
    a, sa, xa = await tcp_peer("a", 1000, 1)
    try:
        await raw_send(b.addr, b"GET / HTTP/1.1\r\n\r\n")
        await raw_send(b.addr, PREFIX.pack(MAGIC, MsgType.HELLO, 0, 10, 1 << 40))  # oversize
        await raw_send(b.addr, PREFIX.pack(MAGIC, MsgType.HELLO, 0, 5, 0) + b"\x93\x01")  # cut
        await raw_send(b.addr, bytes(range(256)) * 100)
        out = await xa.exchange(b.addr)
        assert out.ok, out.reason
    finally:
        await a.close()
        await b.close()


async def test_port_in_use_and_nobody_listening_give_clear_errors():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        node = Node(TcpTransport(), "x")
        try:
            await node.start("127.0.0.1", port)
            raise AssertionError("bound a port in use")
        except TransportError as exc:
            assert f"cannot listen on 127.0.0.1:{port}" in str(exc)
    finally:
        s.close()
    node = Node(TcpTransport(), "y")
    try:
        await node.open(f"127.0.0.1:{port}", 1.0)
        raise AssertionError("connected to a closed port")
    except TransportError as exc:
        assert "refused" in str(exc).lower()


async def test_connections_beyond_the_limit_are_refused():
    from p2p.node import NodeConfig

    b = Node(TcpTransport(), "b", NodeConfig(max_connections=2))
    await b.start("127.0.0.1", 0)
    a = Node(TcpTransport(), "a")
    try:
        kept = [await a.open(b.addr) for _ in range(2)]
        try:
            await a.open(b.addr, 1.0)
            raise AssertionError("a third connection was served")
        except TransportError:
            pass
        kept[0].close()
        await asyncio.sleep(0.1)
        (await a.open(b.addr)).close()  # a slot is free again
        kept[1].close()
    finally:
        await a.close()
        await b.close()


async def test_peer_sockets_give_up_on_unacknowledged_data():
    from p2p.transport import USER_TIMEOUT_MS

    b = Node(TcpTransport(), "b")
    await b.start("127.0.0.1", 0)
    a = Node(TcpTransport(), "a")
    try:
        conn = await a.open(b.addr)
        sock = conn._proto.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        conn.close()
    finally:
        await a.close()
        await b.close()


async def test_the_delta_is_computed_while_the_payload_arrives(monkeypatch):
    """Over real TCP, most of the delta is done before the last byte, not after it."""
    from gossip import averaging

    left: list[int] = []  # values still to do when the whole payload was in
    finish = averaging.DeltaStream.finish

    def spy(self, remote):
        left.append(remote.size - self.done)
        return finish(self, remote)

    monkeypatch.setattr(averaging.DeltaStream, "finish", spy)
    size = 4_000_000  # 16 MB each way
    await averaged_over_tcp(size)
    assert len(left) == 2  # one stream per side
    assert max(left) < size // 4, left


async def test_exchange_waits_for_a_step_that_holds_the_weights():
    """A training step holding the lock sends snapshot and mix to a worker thread."""
    untouched: list[bool] = []  # per store: were its weights unchanged when the step ended?

    def end_step(store, before):
        untouched.append(bool(np.array_equal(store.weights, before)))
        store.lock.release()

    def hold_the_locks(sa, sb):
        loop = asyncio.get_running_loop()
        for store in (sa, sb):  # the "steps" end 50 ms after the exchange starts
            store.lock.acquire()
            loop.call_later(0.05, end_step, store, store.weights.copy())

    await averaged_over_tcp(600_000, hold_the_locks)
    assert untouched == [True, True]  # nothing was mixed in while a step held the weights


async def test_a_short_produced_payload_never_goes_out_as_a_frame():
    a, _, _ = await tcp_peer("a", 10, 1)
    b, _, _ = await tcp_peer("b", 10, 2)
    try:
        conn = await a.open(b.addr)
        buf = np.zeros(1000, np.float32)
        with pytest.raises(TransportError, match="produced 400 of 4000"):
            await conn.send_produced(MsgType.EXCH_PAYLOAD, {}, buf, iter([100, 400]))
        assert conn.closed
    finally:
        await a.close()
        await b.close()


async def test_a_producer_that_fails_midway_closes_the_connection():
    a, _, _ = await tcp_peer("a", 10, 1)
    b, _, _ = await tcp_peer("b", 10, 2)

    def failing():
        yield 400
        raise RuntimeError("copy failed")

    try:
        conn = await a.open(b.addr)
        buf = np.zeros(1000, np.float32)
        with pytest.raises(RuntimeError, match="copy failed"):
            await conn.send_produced(MsgType.EXCH_PAYLOAD, {}, buf, failing())
        assert conn.closed
    finally:
        await a.close()
        await b.close()
