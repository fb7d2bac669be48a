"""Several peers in one process on the in-memory network, averaging to the mean."""

import asyncio
import random

import msgpack
import numpy as np
import pytest

from gossip.exchange import Exchanger, GossipConfig
from gossip.screening import RobustMixing
from gossip.store import ArrayStore
from p2p.framing import MsgType
from p2p.memnet import MemoryNetwork
from p2p.node import Node, NodeConfig


@pytest.fixture
async def net():
    """The in-memory network. Every transport on it is closed at teardown, as closing each
    peer would: a connection the peers pooled keeps a task serving it until then."""
    network = MemoryNetwork()
    yield network
    for transport in network.transports:
        await transport.close()


# Independent random vectors are not a swarm grown from one start: robust mixing
# (gossip.screening, tested in test_robust_mem.py) would rightly refuse them, so the tests of
# the averaging protocol itself turn it off.
PLAIN = GossipConfig(robust=RobustMixing(enabled=False))


async def make_peers(net, n, size=64, seed=0, config=PLAIN):
    rng = np.random.default_rng(seed)
    peers = []
    for i in range(n):
        node = Node(net.transport(), f"p{i}", NodeConfig(handshake_timeout=0.5))
        await node.start("h", 0)
        store = ArrayStore(rng.normal(size=size))
        peers.append((node, store, Exchanger(node, store, config)))
    return peers


async def test_gossip_converges_to_the_mean(net):
    peers = await make_peers(net, 8)
    mean = np.mean([s.weights for _, s, _ in peers], axis=0)
    rng = random.Random(1)

    async def worker(i):
        # Keep gossiping until the swarm has completed 300 exchanges; busy declines (two
        # peers that picked each other) just mean another try.
        while sum(ex.exchanges for _, _, ex in peers) < 600:
            j = rng.choice([k for k in range(8) if k != i])
            await peers[i][2].exchange(peers[j][0].addr)
            await asyncio.sleep(rng.random() * 0.005)  # peers are not in lockstep

    async with asyncio.timeout(60):
        await asyncio.gather(*(worker(i) for i in range(8)))
    spread = max(np.abs(s.weights - mean).max() for _, s, _ in peers)
    assert spread < 1e-3
    assert all(ex.exchanges > 0 for _, _, ex in peers)
    # Pairwise averaging preserves the sum, so the mean is where they meet.
    np.testing.assert_allclose(np.mean([s.weights for _, s, _ in peers], axis=0), mean, atol=1e-5)


async def test_both_sides_end_with_the_same_average(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    expect = (sa.weights + sb.weights) / 2
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason
    await asyncio.sleep(0.01)
    np.testing.assert_allclose(sa.weights, expect, atol=1e-6)
    np.testing.assert_allclose(sb.weights, expect, atol=1e-6)


async def test_an_exchange_records_the_relative_distance_to_the_partner(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    expect = float(np.linalg.norm(sb.weights - sa.weights) / np.linalg.norm(sa.weights))
    assert xa.take_disagreement() is None  # nothing exchanged yet
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason
    await asyncio.sleep(0.01)
    assert xa.last_distance == pytest.approx(expect, rel=1e-4)
    assert xa.take_disagreement() == pytest.approx(expect, rel=1e-4)
    assert xa.take_disagreement() is None  # a mean since the last read
    assert xb.take_disagreement() is not None  # the responder measured its side too
    await xa.exchange(b.addr)
    await asyncio.sleep(0.01)
    assert xa.last_distance < 1e-5  # the two are the same average now


async def test_busy_peer_declines_and_different_schema_is_refused(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    xb._busy = True
    out = await xa.exchange(b.addr)
    assert not out.ok and out.busy
    xb._busy = False
    sb.schema = "other-model"
    before = sa.weights.copy()
    out = await xa.exchange(b.addr)
    assert not out.ok and "does not match" in out.reason
    assert b.addr in xa.incompatible
    np.testing.assert_array_equal(sa.weights, before)


async def test_non_finite_weights_are_never_applied(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    before_b = sb.weights.copy()
    # A broken neighbour offers properly, then sends a NaN payload.
    conn = await a.open(b.addr)
    await conn.send(MsgType.EXCH_OFFER, {"schema": sb.schema, "nbytes": sb.nbytes, "name": "x"})
    assert (await conn.recv()).type == MsgType.EXCH_ACCEPT
    bad = np.full(sb.weights.shape, np.nan, np.float32)
    await conn.send(MsgType.EXCH_PAYLOAD, {}, [bad])
    await conn.recv()
    for _ in range(100):
        if xb.rejected:
            break
        await asyncio.sleep(0.01)
    assert xb.rejected == 1
    np.testing.assert_array_equal(sb.weights, before_b)
    # A diverged peer's infinity is refused by whoever receives it, and the diverged peer
    # applies nothing either; having seen its own weights are not finite, it then refuses
    # to send them at all until they are finite again.
    sb.weights[3] = np.inf
    before_a, before_b = sa.weights.copy(), sb.weights.copy()
    out = await xa.exchange(b.addr)
    assert not out.ok and "NaN or infinity" in out.reason
    for _ in range(100):
        if xb.rejected == 2:
            break
        await asyncio.sleep(0.01)
    assert xb.rejected == 2  # b refused the average too: its own half is not finite
    out = await xa.exchange(b.addr)
    assert not out.ok and "our own weights are not finite" in out.reason
    np.testing.assert_array_equal(sa.weights, before_a)
    np.testing.assert_array_equal(sb.weights, before_b)
    sb.weights[3] = 0.0  # recovered (a restart from a checkpoint, say): b exchanges again
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason


async def test_garbage_from_a_neighbour_does_not_crash_the_peer(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    conn = await net.transport().connect(b.addr, 1.0)
    await conn.send(MsgType.HELLO, {"versions": [99], "cluster": "gossip-train"})
    reply = await conn.recv()
    assert reply.type == MsgType.ERROR and "protocol version" in reply.header["reason"]
    conn2 = await a.open(b.addr)
    await conn2.send(MsgType.EXCH_OFFER, {"schema": 5, "nbytes": "x"})
    reply = await conn2.recv()
    assert reply.type == MsgType.EXCH_DECLINE
    await conn2.send(200, {"whatever": 1})  # unknown type: ignored
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason


async def test_values_too_deep_to_print_are_refused_with_a_short_reason(net):
    # Found by benchmarks/fuzz.py: the reasons and the layout diff printed the peer's values
    # with repr(), which raises RecursionError for ~1000 levels of nesting (and a layout
    # entry whose shape is not a list raised TypeError), so the handler died instead.
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    sb.layout = [["w", [64], "torch.float32"]]  # as FlatWeights has
    deep = msgpack.unpackb(b"\x91" * 1000 + b"\x80")
    conn = await a.open(b.addr)
    await conn.send(MsgType.EXCH_OFFER, {"schema": deep, "nbytes": deep, "name": deep})
    reply = await conn.recv()
    assert reply.type == MsgType.EXCH_DECLINE and reply.header["incompatible"]
    assert "does not match ours" in reply.header["reason"]
    assert len(reply.header["reason"]) < 500
    await conn.send(MsgType.PULL_REQ, {"schema": deep, "layout": [["w", 64, "torch.float32"]]})
    reply = await conn.recv()
    assert reply.type == MsgType.ERROR and "has no shape" in reply.header["reason"]
    await conn.send(MsgType.PULL_REQ, {"schema": "x", "layout": [[deep, [deep], deep]]})
    reply = await conn.recv()
    assert reply.type == MsgType.ERROR and "tensor 0: ours is w [64]" in reply.header["reason"]
    assert len(reply.header["reason"]) < 600
    conn.close()
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason


async def test_an_offer_whose_sender_is_too_deep_to_print_is_answered(net):
    # Found by benchmarks/fuzz.py: a matching offer named its sender by str() of its "addr"
    # (robust mixing keys refusals and quarantines by it), which raises RecursionError for
    # ~1000 levels of nesting: the handler died instead of answering.
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    deep = msgpack.unpackb(b"\x91" * 1000 + b"\x80")
    conn = await a.open(b.addr)
    offer = {"schema": sb.schema, "nbytes": sb.nbytes, "addr": deep, "name": "x" * 5000}
    await conn.send(MsgType.EXCH_OFFER, offer)
    reply = await conn.recv()
    assert reply.type in (MsgType.EXCH_ACCEPT, MsgType.EXCH_DECLINE), reply
    conn.close()
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason


async def test_offers_from_ever_new_names_are_remembered_up_to_a_bound(net):
    # Found by benchmarks/fuzz.py: every refused offer recorded the caller's name, whatever
    # it was, so a stranger inventing names grew Exchanger.incompatible without bound.
    from gossip.exchange import MAX_INCOMPATIBLE

    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    conn = await a.open(b.addr)
    for i in range(MAX_INCOMPATIBLE + 50):
        await conn.send(MsgType.EXCH_OFFER, {"schema": "other", "nbytes": 4, "name": f"n{i}"})
        assert (await conn.recv()).type == MsgType.EXCH_DECLINE
    conn.close()
    assert len(xb.incompatible) == MAX_INCOMPATIBLE
    assert "n0" in xb.incompatible


async def test_a_responder_s_reason_too_deep_to_print_is_an_outcome_not_a_crash(net):
    # Found by benchmarks/fuzz.py: the initiator made text of the responder's reason with
    # str(), which raises RecursionError for ~1000 levels of nesting, so exchange() (which
    # promises never to raise) and pull() died, and with them the agent's gossip loop.
    from gossip.exchange import IncompatiblePeer

    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    deep = msgpack.unpackb(b"\x91" * 1000 + b"\x80")

    async def decline(conn, frame):
        await conn.send(MsgType.EXCH_DECLINE, {"reason": deep, "incompatible": True})

    async def accept_then_error(conn, frame):
        await conn.send(MsgType.EXCH_ACCEPT, {})
        await conn.send(MsgType.ERROR, {"reason": deep})

    async def refuse_pull(conn, frame):
        await conn.send(MsgType.ERROR, {"reason": deep, "incompatible": True})

    b.handlers[MsgType.EXCH_OFFER] = decline
    out = await xa.exchange(b.addr)
    assert not out.ok and out.reason.startswith("[[[") and len(out.reason) < 300
    assert xa.incompatible[b.addr] == out.reason
    b.handlers[MsgType.EXCH_OFFER] = accept_then_error
    out = await xa.exchange(b.addr)
    assert not out.ok and out.reason.startswith("[[[") and len(out.reason) < 300
    b.handlers[MsgType.PULL_REQ] = refuse_pull
    with pytest.raises(IncompatiblePeer, match=r"refused us: \[\[\["):
        await xa.pull(b.addr)


async def test_a_pull_with_min_step_moves_no_weights_from_a_neighbour_that_has_not_trained(net):
    # A newcomer to a fresh swarm holds the same init: the neighbour answers with its step.
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    steps = {"b": 0}
    xb.step_fn = lambda: steps["b"]
    remote, step = await xa.pull(b.addr, min_step=1)
    assert remote is None and step == 0
    assert xb.pull_replies == xb.pull_reply_bytes == 0
    steps["b"] = 7
    remote, step = await xa.pull(b.addr, min_step=1)
    assert step == 7 and remote is not None
    np.testing.assert_array_equal(remote, sb.weights.astype(np.float32))
    assert (xb.pull_replies, xb.pull_reply_bytes) == (1, sb.nbytes)
    # Without min_step (a restarted peer, a resync) the weights come at any step.
    steps["b"] = 0
    remote, step = await xa.pull(b.addr)
    assert remote is not None and step == 0


async def test_dead_and_paused_peers_fail_within_the_deadline(net):
    (a, sa, xa), (b, sb, xb), (c, sc, xc) = await make_peers(net, 3)
    net.kill(b.addr)
    out = await xa.exchange(b.addr)
    assert not out.ok and "refused" in out.reason
    net.pause(c.addr)
    before = sa.weights.copy()
    out = await xa.exchange(c.addr)
    assert not out.ok
    np.testing.assert_array_equal(sa.weights, before)


async def test_counts_say_what_became_of_each_exchange(net):
    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2)
    assert (await xa.exchange(b.addr)).ok
    await asyncio.sleep(0.01)
    xb.ready = False  # catching up: b declines
    out = await xa.exchange(b.addr)
    assert out.declined and not out.ok
    assert xa.counts == {**dict.fromkeys(xa.counts, 0), "started": 2, "declined_by_peer": 1}
    assert xb.counts == {**dict.fromkeys(xb.counts, 0), "answered": 1, "declined": 1}


async def test_deadlines_follow_the_link_rate_exchanges_achieve(net):
    # A slow link: a timed-out exchange halves the rate deadlines assume (down to a floor);
    # a completed one sets it to half what it achieved, never above the configured rate.
    from gossip.exchange import MIN_LINK_RATE

    (a, sa, xa), (b, sb, xb) = await make_peers(net, 2, size=250_000)
    configured = xa.config.deadline_min_rate
    first = xa.deadline()
    assert first == pytest.approx(2.0 + 2 * 1e6 / configured)
    xa._timed_out()
    assert xa.link_rate == configured / 2 and xa.deadline() > first
    for _ in range(100):
        xa._timed_out()
    assert xa.link_rate == MIN_LINK_RATE
    out = await xa.exchange(b.addr)
    assert out.ok, out.reason
    assert MIN_LINK_RATE <= xa.link_rate <= configured
    xa._completed(1.0)  # 1 MB each way in 1 s
    assert xa.link_rate == pytest.approx(0.5e6)
