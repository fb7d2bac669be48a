"""Bytes counted by kind on the in-memory network: a SWIM message is membership, an exchange
and a catch-up pull are weights, the handshake is control, and the kinds add up to the totals."""

from __future__ import annotations

import asyncio

import numpy as np

from gossip.exchange import Exchanger, GossipConfig
from gossip.screening import RobustMixing
from gossip.store import ArrayStore
from p2p.framing import Frame, MsgType, encode_bytes
from p2p.memnet import MemoryNetwork
from p2p.node import Node
from p2p.transport import Connection, Stats

PING = {"t": "ping", "from": "a", "seq": 1, "target": "b", "updates": []}


def assert_adds_up(stats: Stats) -> None:
    kinds = stats.by_kind()
    assert sum(k["sent"] for k in kinds.values()) == stats.sent
    assert sum(k["received"] for k in kinds.values()) == stats.received


async def test_kinds_add_up_and_name_what_the_bytes_were_for() -> None:
    net = MemoryNetwork()
    rng = np.random.default_rng(0)
    start = rng.normal(size=1000)
    nodes, exchangers = [], []
    for name in ("a", "b"):
        node = Node(net.transport(), name)
        await node.start("h", 0)
        store = ArrayStore(start + 0.01 * rng.normal(size=1000))
        nodes.append(node)
        exchangers.append(Exchanger(node, store, GossipConfig(robust=RobustMixing(False))))
    (a, b), (xa, xb) = nodes, exchangers
    pinged = asyncio.Event()

    async def on_swim(conn: Connection, frame: Frame) -> None:
        pinged.set()

    b.handlers[MsgType.SWIM] = on_swim
    sa, sb = a.transport.stats, b.transport.stats
    try:
        async with asyncio.timeout(10):
            await a.send_oneway(b.addr, MsgType.SWIM, PING)
            await pinged.wait()
            ping = len(encode_bytes(MsgType.SWIM, PING))
            assert sa.by_kind()["membership"] == {"sent": ping, "received": 0}
            assert sb.by_kind()["membership"] == {"sent": 0, "received": ping}
            assert sa.by_kind()["weights"] == {"sent": 0, "received": 0}
            assert sa.by_kind()["control"]["sent"] > 0  # the HELLO

            out = await xa.exchange(b.addr)
            assert out.ok, out.reason
            while not xb.exchanges:
                await asyncio.sleep(0.01)
            nbytes = xa.store.nbytes
            for stats in (sa, sb):
                assert min(stats.by_kind()["weights"].values()) > nbytes
                assert sum(stats.by_kind()["membership"].values()) == ping
                assert_adds_up(stats)
            for ex in (xa, xb):
                assert ex.raw_payload_bytes == ex.wire_payload_bytes == nbytes
                assert ex.compression_ratio == 1.0

            before = sb.by_kind()["weights"]["sent"]
            await xa.pull(b.addr)
            assert sb.by_kind()["weights"]["sent"] > before + nbytes  # the pull reply
            assert xb.raw_payload_bytes == nbytes  # the exchange alone
            assert (xb.pull_replies, xb.pull_reply_bytes) == (1, nbytes)
            assert_adds_up(sa)
            assert_adds_up(sb)
    finally:
        for tr in net.transports:
            await tr.close()
