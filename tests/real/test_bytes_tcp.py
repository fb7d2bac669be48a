"""Bytes counted by kind over real TCP, in the clear and sealed: a SWIM message is
membership, an exchange weights, the handshake control, and the kinds add up to the totals.
Sealed, the bytes counted are the records on the wire, under the kind of what they carry."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gossip.exchange import Exchanger
from gossip.store import ArrayStore
from p2p.framing import Frame, Kind, MsgType, encode_bytes
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring, new_secret
from p2p.transport import Connection, Stats, TcpTransport

pytestmark = pytest.mark.real

PING = {"t": "ping", "from": "a", "seq": 1, "target": "b", "updates": []}
SIZE = 600_000  # floats: 2.4 MB, several sealed records and many TCP reads


def assert_adds_up(stats: Stats) -> None:
    kinds = stats.by_kind()
    assert sum(k["sent"] for k in kinds.values()) == stats.sent
    assert sum(k["received"] for k in kinds.values()) == stats.received


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
async def test_kinds_add_up_over_tcp(sealed: bool) -> None:
    config = NodeConfig(keyring=Keyring((new_secret().encode(),)) if sealed else None)
    start = np.random.default_rng(0).normal(size=SIZE)
    nodes, exchangers = [], []
    for seed, name in enumerate(("a", "b"), 1):
        node = Node(TcpTransport(), name, config)
        await node.start("127.0.0.1", 0)
        noise = 0.01 * np.random.default_rng(seed).normal(size=SIZE)
        nodes.append(node)
        exchangers.append(Exchanger(node, ArrayStore(start + noise)))
    (a, b), (xa, xb) = nodes, exchangers
    pinged = asyncio.Event()

    async def on_swim(conn: Connection, frame: Frame) -> None:
        pinged.set()

    b.handlers[MsgType.SWIM] = on_swim
    sa, sb = a.transport.stats, b.transport.stats
    try:
        async with asyncio.timeout(20):
            await a.send_oneway(b.addr, MsgType.SWIM, PING)
            await pinged.wait()
            ping = len(encode_bytes(MsgType.SWIM, PING))
            memb = sa.by_kind()["membership"]["sent"]
            # Sealed, the record weighs more than the frame it carries (tag, its own framing).
            assert memb > ping if sealed else memb == ping
            assert sb.by_kind()["membership"]["received"] == memb
            out = await xa.exchange(b.addr)
            assert out.ok, out.reason
            while not xb.exchanges:
                await asyncio.sleep(0.01)
            for stats in (sa, sb):
                kinds = stats.by_kind()
                assert min(kinds["weights"].values()) > SIZE * 4
                assert kinds["membership"]["sent"] + kinds["membership"]["received"] == memb
                assert kinds["control"]["sent"] > 0 and kinds["control"]["received"] > 0
                assert_adds_up(stats)
                # Every sealed byte went out after the handshake, in records.
                assert (stats.sent_by_kind[Kind.SEALED] > SIZE * 4) == sealed
            assert xa.compression_ratio == xb.compression_ratio == 1.0
    finally:
        await a.close()
        await b.close()
