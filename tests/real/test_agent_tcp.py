"""The gossip agent on real TCP: a fresh peer waits for its swarm to form before training."""

import asyncio

import numpy as np

from gossip.agent import Agent, AgentConfig
from gossip.events import Events
from gossip.store import ArrayStore
from p2p.transport import TcpTransport


class Recorder(Events):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.seen.append(event)


def agent(wait_peers: int, join: tuple[str, ...] = (), timeout: float = 10.0):
    events = Recorder()
    config = AgentConfig(
        profile="test", join=join, join_timeout=timeout, wait_peers=wait_peers, seed=len(join)
    )
    return Agent(config, ArrayStore(np.zeros(8)), TcpTransport(), events), events


async def test_a_fresh_peer_trains_only_once_its_swarm_has_formed():
    first, first_events = agent(wait_peers=3)
    start = asyncio.create_task(first.start())
    await asyncio.sleep(0.3)
    # Still assembling: it has bound, but nobody else is here yet.
    assert not start.done() and first.status == "starting"
    seed = (first.node.addr,)
    others = [agent(wait_peers=3, join=seed) for _ in range(2)]
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(start, *(a.start() for a, _ in others))
        for events in [first_events] + [e for _, e in others]:
            assembled = [e for e in events.seen if e["kind"] == "assembled"]
            assert len(assembled) == 1 and assembled[0]["members"] == 3, events.seen
        assert first.status == "training"
    finally:
        for a in [first] + [a for a, _ in others]:
            await a.close()


async def test_a_peer_whose_swarm_never_forms_starts_alone_after_the_join_timeout():
    lone, events = agent(wait_peers=4, timeout=0.5)
    try:
        async with asyncio.timeout(10):
            await lone.start()
        (assembled,) = [e for e in events.seen if e["kind"] == "assembled"]
        assert assembled["members"] == 1 and assembled["wanted"] == 4
        assert assembled["seconds"] >= 0.5
        assert lone.status == "training"
    finally:
        await lone.close()


async def test_a_peer_joins_through_a_dns_name():
    first, _ = agent(wait_peers=2)
    start = asyncio.create_task(first.start())
    await asyncio.sleep(0.2)
    port = first.node.addr.rpartition(":")[2]
    second, events = agent(wait_peers=2, join=(f"dns:localhost:{port}",))
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(start, second.start())
        (resolved,) = [e for e in events.seen if e["kind"] == "resolved"]
        assert f"127.0.0.1:{port}" in resolved["addrs"]
        assert second.alive_count() == 1 and first.alive_count() == 1
    finally:
        await first.close()
        await second.close()


async def test_a_dns_name_that_does_not_resolve_is_an_agent_error():
    import pytest

    from gossip.agent import AgentError

    lone, _ = agent(wait_peers=0, join=("dns:no-such-host.invalid:7000",), timeout=0.5)
    try:
        with pytest.raises(AgentError, match="no-such-host.invalid"):
            async with asyncio.timeout(15):
                await lone.start()
    finally:
        await lone.abort()
