"""Compressed gossip and infrequent averaging on the in-memory network: 16 peers."""

import asyncio
import random

import numpy as np
import pytest

from gossip.exchange import Exchanger, GossipConfig
from gossip.outer import OuterConfig, OuterStore
from gossip.screening import RobustMixing
from gossip.store import ArrayStore
from p2p.framing import MsgType
from p2p.memnet import MemoryNetwork
from p2p.node import Node, NodeConfig


@pytest.fixture
async def net():
    network = MemoryNetwork()
    yield network
    for transport in network.transports:
        await transport.close()


OFF = RobustMixing(enabled=False)  # independent random starts: robust mixing would refuse


async def peers_on(net, stores, config):
    out = []
    for i, store in enumerate(stores):
        node = Node(net.transport(), f"p{i}", NodeConfig(handshake_timeout=0.5))
        await node.start("h", 0)
        out.append((node, store, Exchanger(node, store, config)))
    return out


async def gossip(peers, rounds, rng, between=None):
    """Each round, every peer (in random order) exchanges with a random other one."""
    for _ in range(rounds):
        for i in rng.sample(range(len(peers)), len(peers)):
            if between is not None:
                between(i)
            j = rng.choice([k for k in range(len(peers)) if k != i])
            await peers[i][2].exchange(peers[j][0].addr)


@pytest.mark.parametrize("compress", ["int8", "fp16", "bf16"])
async def test_compressed_gossip_of_16_peers_converges_to_the_mean(net, compress):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(16, 3000)).astype(np.float32)
    mean = start.mean(axis=0)
    config = GossipConfig(compress=compress, robust=OFF)
    peers = await peers_on(net, [ArrayStore(w.copy()) for w in start], config)
    async with asyncio.timeout(120):
        await gossip(peers, 40, random.Random(1))
    final = np.stack([s.weights for _, s, _ in peers])
    spread = np.abs(final - final.mean(axis=0)).max()
    # Exact pairwise conservation of decoded vectors; error feedback keeps the rounding from
    # adding up: the swarm ends at the mean within a few quantization steps.
    step = np.abs(start).max() / 127
    assert spread < 2 * step, spread
    assert np.abs(final.mean(axis=0) - mean).max() < 2 * step
    assert all(ex.exchanges > 0 for _, _, ex in peers)
    assert peers[0][2].wire_nbytes < (0.26 if compress == "int8" else 0.51) * start[0].nbytes


async def test_h_step_averaging_with_int8_finds_the_quadratic_s_optimum(net):
    # f_i(x) = |x - c_i|^2 / 2 on peer i; the swarm's optimum is mean(c), in closed form.
    # Each peer takes H = 10 gradient steps (lr 0.1), then an outer step on its outer
    # weights, which int8-compressed gossip averages pairwise. With shards this different,
    # each outer step pulls a peer toward its own c_i: the peers agree only as closely as
    # the outer lr allows (client drift), so the run ends with a smaller outer lr.
    rng = np.random.default_rng(2)
    n, dim, h = 16, 500, 10
    centres = rng.normal(size=(n, dim)).astype(np.float32)
    optimum = centres.mean(axis=0)
    spread = np.abs(centres - optimum).max()
    inner = [ArrayStore(np.ones(dim, dtype=np.float32)) for _ in range(n)]
    outer = [OuterStore(s, OuterConfig(steps=h, lr=0.7, momentum=0.0)) for s in inner]
    peers = await peers_on(net, outer, GossipConfig(compress="int8", robust=OFF))

    def local_round(i):
        w = inner[i].weights
        for _ in range(h):
            w -= 0.1 * (w - centres[i])
        outer[i].step()

    async with asyncio.timeout(120):
        await gossip(peers, 60, random.Random(3), between=local_round)
        for o in outer:
            o.config = OuterConfig(steps=h, lr=0.05, momentum=0.0)
        await gossip(peers, 60, random.Random(4), between=local_round)
    xs = np.stack([o.array for o in outer])
    assert np.abs(xs.mean(axis=0) - optimum).max() < 0.05 * spread
    assert np.abs(xs - optimum).max() < 0.15 * spread
    assert all(o.outer_steps == 120 for o in outer)
    assert all(ex.rejected == 0 and ex.exchanges > 0 for _, _, ex in peers)


async def test_peers_that_compress_differently_decline_each_other_by_name(net):
    a, b = await peers_on(
        net, [ArrayStore(np.ones(64)), ArrayStore(np.ones(64))], GossipConfig(compress="int8")
    )
    c_node = Node(net.transport(), "plain", NodeConfig(handshake_timeout=0.5))
    await c_node.start("h", 0)
    plain = Exchanger(c_node, ArrayStore(np.ones(64)), GossipConfig())
    out = await plain.exchange(a[0].addr)
    assert not out.ok and "int8" in out.reason and "--compress" in out.reason
    assert a[0].addr in plain.incompatible
    assert (await a[2].exchange(b[0].addr)).ok


async def test_a_compressed_payload_whose_scales_lie_is_refused_and_nothing_moves(net):
    (a, sa, xa), (b, sb, xb) = await peers_on(
        net,
        [ArrayStore(np.zeros(600)), ArrayStore(np.ones(600))],
        GossipConfig(compress="int8"),
    )
    before = sb.weights.copy()
    conn = await a.open(b.addr)
    await conn.send(MsgType.EXCH_OFFER, xa._offer())
    assert (await conn.recv()).type == MsgType.EXCH_ACCEPT
    wire = np.zeros(xb.wire_nbytes, dtype=np.uint8)
    wire[:4] = np.frombuffer(np.float32(np.nan).tobytes(), dtype=np.uint8)
    await conn.send(MsgType.EXCH_PAYLOAD, {}, [wire])
    await conn.recv()  # b's own payload
    await asyncio.sleep(0.05)
    np.testing.assert_array_equal(sb.weights, before)
    assert xb.rejected == 1
    conn.close()
