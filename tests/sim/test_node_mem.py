"""A node on the in-memory network: the listener's side of the handshake on malformed
HELLOs, what one-way sends remember, and the limits its sealed connections decode under."""

import asyncio

import msgpack
import pytest

from p2p.framing import MAGIC, PREFIX, Limits, MsgType
from p2p.memnet import MemoryConnection, MemoryNetwork
from p2p.node import HandshakeError, Node, NodeConfig
from p2p.secure import Keyring, SealedConnection
from p2p.transport import TransportError

DEEP = msgpack.unpackb(b"\x91" * 1000 + b"\x80")  # what msgpack decodes; too deep for repr()


@pytest.fixture
async def node():
    net = MemoryNetwork()
    n = Node(net.transport(), "b")
    await n.start("h", 0)
    yield n
    for transport in net.transports:
        await transport.close()


# Found by benchmarks/fuzz.py: an unhashable version raised TypeError out of _accept_hello,
# and a value nested ~1000 deep RecursionError (the refusal printed it with repr()).
@pytest.mark.parametrize(
    ("hello", "says"),
    [
        ({"versions": [[1]], "cluster": "gossip-train"}, "no common protocol version"),
        ({"versions": [{"v": 1}, 2], "cluster": "gossip-train"}, "no common protocol version"),
        ({"versions": DEEP, "cluster": "gossip-train"}, "no common protocol version"),
        ({"versions": {"a": DEEP}, "cluster": "gossip-train"}, "no common protocol version"),
        ({"versions": [1], "cluster": DEEP}, "cluster mismatch"),
        ({"versions": [1], "cluster": "\x00" * 400_000}, "cluster mismatch"),
    ],
)
async def test_a_malformed_hello_gets_a_short_refusal(node, hello, says):
    conn = await node.transport.connect(node.addr, 1.0)
    await conn.send(MsgType.HELLO, hello)
    reply = await conn.recv()
    assert reply.type == MsgType.ERROR
    assert reply.header["reason"].startswith(says)
    assert len(reply.header["reason"]) < 300
    conn.close()
    ok = await node.transport.connect(node.addr, 1.0)
    await ok.send(MsgType.HELLO, {"versions": [1, [2]], "cluster": "gossip-train"})
    assert (await ok.recv()).type == MsgType.HELLO_OK
    ok.close()


async def test_one_way_sends_remember_only_pooled_addresses(node):
    # Found by benchmarks/fuzz.py: send_oneway kept a lock for every address it was asked to
    # send to, for ever; SWIM answers every ping at the address its sender names, so a
    # stranger inventing addresses grew it without bound.
    other = Node(node.transport.net.transport(), "c")
    await other.start("h", 0)
    for i in range(300):
        with pytest.raises(TransportError):
            await node.send_oneway(f"10.9.{i // 250}.{i % 250}:1", MsgType.SWIM, {"type": "ack"})
    sends = [node.send_oneway(other.addr, MsgType.SWIM, {"type": "ack"}) for _ in range(5)]
    await asyncio.gather(*sends)
    assert set(node._pool_locks) == set(node._pool) == {other.addr}
    assert node._pool_users == {}


async def test_bytes_the_decoder_refuses_close_the_connection_like_tcp(node):
    # Found by benchmarks/fuzz.py: the receiver's FrameError was raised out of the sender's
    # send() (the bytes are decoded as they are handed over), where TCP drops the
    # connection; and every connection was kept by its transport after it closed.
    net = MemoryNetwork(Limits(max_header=256))
    server = Node(net.transport(), "s")
    await server.start("h", 0)
    client = net.transport()
    for i in range(50):
        conn = await client.connect(server.addr, 1.0)
        if i % 2:
            await conn.send(MsgType.HELLO, {"versions": [1], "cluster": "x" * 1000})  # too big
        else:
            assert isinstance(conn, MemoryConnection) and conn.other is not None
            conn.other._arrive(b"HTTP/1.1 200 OK\r\n\r\n")
        with pytest.raises(TransportError):
            await conn.recv()
        assert conn.closed
    assert len(client.conns) <= 1
    for transport in net.transports:
        await transport.close()


async def test_a_refusal_too_deep_to_print_is_a_handshake_error(node):
    # Found by benchmarks/fuzz.py: open() put the listener's reason in its error with an
    # f-string, which raises RecursionError for ~1000 levels of nesting.
    async def refuse(conn):
        await conn.recv()
        await conn.send(MsgType.ERROR, {"reason": DEEP})

    host, port = await node.transport.net.transport().listen("r", 0, refuse)
    with pytest.raises(HandshakeError, match=r"refused us: \[\[\[") as err:
        await node.open(f"{host}:{port}", 1.0)
    assert len(str(err.value)) < 400


async def test_a_sealed_frame_is_decoded_under_the_networks_limits():
    # Found by benchmarks/fuzz.py: Node decodes what sealed records carry under its
    # transport's limits, which a MemoryTransport did not name; its sealed connections fell
    # back to Limits() and took a frame that declared 2 GiB, allocating the 2 GiB.
    ring = Keyring((b"sim-test-secret-0123456789",))
    net = MemoryNetwork(Limits(max_payload=1 << 20))
    server = Node(net.transport(), "s", NodeConfig(keyring=ring))
    seen = []

    async def on_status(conn, frame):
        seen.append(frame)

    server.handlers[MsgType.STATUS_REQ] = on_status
    await server.start("h", 0)
    client = Node(net.transport(), "c", NodeConfig(keyring=ring))
    conn = await client.open(server.addr, 1.0)
    assert isinstance(conn, SealedConnection)
    await conn.send(MsgType.STATUS_REQ, {})
    head = msgpack.packb({"_seg": [1 << 30]})
    lying = PREFIX.pack(MAGIC, MsgType.STATUS_REQ, 0, len(head), 1 << 30) + head  # 1 GiB
    await conn.inner.send(MsgType.SEALED, {}, [conn._seal(lying)])
    async with asyncio.timeout(2):  # refused at once, not waited for
        with pytest.raises(TransportError):
            await conn.recv()
    assert len(seen) == 1
    for transport in net.transports:
        await transport.close()
