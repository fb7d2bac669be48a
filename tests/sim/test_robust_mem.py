"""Robust mixing between peers on the in-memory network: a hostile member among honest ones."""

import asyncio
import random

import numpy as np
import pytest

from gossip.exchange import Exchanger, GossipConfig
from gossip.screening import RobustMixing
from gossip.store import ArrayStore
from p2p.memnet import MemoryNetwork
from p2p.node import Node, NodeConfig

SIZE = 4000


@pytest.fixture
async def net():
    network = MemoryNetwork()
    yield network
    for transport in network.transports:
        await transport.close()


class Swarm:
    """Peers grown from one start; each "trains" by a small drift of its own between
    rounds (a direction of its own, as a non-iid shard gives, plus noise)."""

    def __init__(self, peers, base, rng):
        self.peers, self.base, self.rng = peers, base, rng
        self.events = []
        self.scale = float(np.sqrt(np.mean(base**2)))
        self.pulls = [rng.normal(size=base.size) for _ in peers]
        for i, (_, _, x) in enumerate(peers):
            x.on_event = lambda kind, i=i, **f: self.events.append((i, kind, f))

    def train(self, honest, step=0.01):
        for i in honest:
            w = self.peers[i][1].weights
            drift = 0.5 * self.pulls[i] + self.rng.normal(size=w.size)
            w += (step * self.scale * drift).astype(np.float32)

    async def round(self, order, rng):
        """Each peer in ``order`` offers an exchange to a random other peer."""
        for i in order:
            j = rng.choice([k for k in range(len(self.peers)) if k != i])
            await self.peers[i][2].exchange(self.peers[j][0].addr)
            await asyncio.sleep(0.002)  # let the responder finish its half

    def kinds(self, kind):
        return [(i, f["subject"]) for i, k, f in self.events if k == kind]


async def make_swarm(net, n, config=None, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=0.05, size=SIZE).astype(np.float32)
    peers = []
    for i in range(n):
        node = Node(net.transport(), f"p{i}", NodeConfig(handshake_timeout=0.5))
        await node.start("h", 0)
        store = ArrayStore(base.copy())
        peers.append((node, store, Exchanger(node, store, config)))
    return Swarm(peers, base, rng)


def make_hostile(swarm, i, mode):
    """Peer i sends poison from now on and mixes nothing in, as a hostile member would."""
    _, store, x = swarm.peers[i]
    w = store.weights
    if mode == "zero":
        w[:] = 0
    elif mode == "negate":
        w *= -1
    elif mode == "scale":
        w *= 10
    else:
        w += swarm.rng.normal(scale=10 * swarm.scale, size=w.size).astype(np.float32)
    x.apply_received = False


def drift_from(swarm, honest):
    """How far the honest peers' mean moved from their start, relative to its norm."""
    mean = np.mean([swarm.peers[i][1].weights for i in honest], axis=0)
    return float(np.linalg.norm(mean - swarm.base) / np.linalg.norm(swarm.base))


@pytest.mark.parametrize("mode", ["zero", "negate", "scale", "noise"])
async def test_a_poisoner_from_step_0_is_refused_then_quarantined_by_every_honest_peer(net, mode):
    swarm = await make_swarm(net, 5)
    honest, evil = [0, 1, 2, 3], 4
    make_hostile(swarm, evil, mode)
    rng = random.Random(1)
    for _ in range(30):
        swarm.train(honest)
        await swarm.round(rng.sample(range(5), 5), rng)
    refused = swarm.kinds("refused")
    assert refused and {s for _, s in refused} == {"p4"}  # nobody honest refused
    assert {i for i, _ in swarm.kinds("quarantined")} == set(honest)
    assert all(s == "p4" for _, s in swarm.kinds("quarantined"))
    # The honest peers moved only by their own training: 30 drifts of 1% each.
    assert drift_from(swarm, honest) < 0.2
    honest_x = [swarm.peers[i][2] for i in honest]
    assert all(x.exchanges > 0 for x in honest_x)
    assert sum(x.screen.refused for x in honest_x) == len(refused)


async def test_without_robust_mixing_the_same_poisoner_drags_the_honest_peers(net):
    swarm = await make_swarm(net, 5, GossipConfig(robust=RobustMixing(enabled=False)))
    honest = [0, 1, 2, 3]
    make_hostile(swarm, 4, "zero")
    rng = random.Random(1)
    for _ in range(30):
        swarm.train(honest)
        await swarm.round(rng.sample(range(5), 5), rng)
    assert not swarm.events
    assert drift_from(swarm, honest) > 0.5  # pulled most of the way to zero


async def test_a_quarantined_peer_is_neither_offered_to_nor_answered(net):
    swarm = await make_swarm(net, 2)
    (a, _, xa), (b, _, xb) = swarm.peers
    make_hostile(swarm, 1, "zero")
    for _ in range(3):
        assert not (await xa.exchange(b.addr)).ok
        await asyncio.sleep(0.002)
    assert xa.quarantined(b.addr) > 0 and swarm.kinds("quarantined") == [(0, "p1")]
    sent = a.transport.stats.sent
    out = await xa.exchange(b.addr)  # not started: no byte leaves
    assert not out.ok and out.reason.startswith("quarantined")
    assert a.transport.stats.sent == sent
    before = xb.exchanges
    out = await xb.exchange(a.addr)  # not answered: declined before any payload
    assert not out.ok and not out.busy and "quarantined for" in out.reason
    assert xb.exchanges == before


async def test_clipping_bounds_how_far_one_exchange_moves_a_peer(net):
    swarm = await make_swarm(net, 2)
    (a, sa, xa), (b, sb, xb) = swarm.peers
    ref = 0.01 * float(np.linalg.norm(swarm.base))
    xa.screen.norms.extend([ref] * 32)  # a has seen many deltas of this length
    direction = swarm.rng.normal(size=SIZE).astype(np.float32)
    direction /= np.linalg.norm(direction)
    sb.weights += 3 * ref * direction  # b is 3x the reference away: accepted, clipped
    before_a, before_b = sa.weights.copy(), sb.weights.copy()
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason
    await asyncio.sleep(0.01)
    moved = sa.weights - before_a
    # a moves half of the delta clipped to 2 x reference, along the delta.
    assert np.linalg.norm(moved) == pytest.approx(0.5 * 2 * ref, rel=1e-3)
    assert float(moved @ direction) == pytest.approx(ref, rel=1e-3)
    assert xa.screen.clipped == 1
    # b, still warming up, takes the delta whole: half of it.
    assert np.linalg.norm(sb.weights - before_b) == pytest.approx(1.5 * ref, rel=1e-3)


async def test_an_honest_swarm_with_shards_of_its_own_raises_no_alarm(net):
    swarm = await make_swarm(net, 6, seed=3)
    rng = random.Random(2)
    for r in range(60):
        swarm.train(range(6), step=0.01 if r < 30 else 0.003)  # slower later: smaller deltas
        await swarm.round(rng.sample(range(6), 6), rng)
    assert not swarm.events  # no refusal, no quarantine
    screens = [x.screen for _, _, x in swarm.peers]
    assert all(s.accepted > 8 and s.refused == 0 for s in screens)
    assert max(s.largest_ratio for s in screens) < 4.0
