"""The order in which a peer tries its neighbours: one whose exchanges fail goes last."""

import asyncio

import numpy as np

from gossip.agent import Agent, AgentConfig
from gossip.exchange import Outcome
from gossip.store import ArrayStore
from p2p.transport import TcpTransport


class Members:
    def __init__(self, addrs):
        self.addrs = addrs

    def alive_addrs(self):
        return [(a, a) for a in self.addrs]


def test_a_neighbour_that_keeps_failing_is_tried_last_until_its_back_off_ends():
    agent = Agent(AgentConfig(seed=1), ArrayStore(np.zeros(4)), TcpTransport())
    agent.membership = Members(["a:1", "b:1", "c:1"])  # type: ignore[assignment]
    tried = []

    async def exchange(addr):
        tried.append(addr)
        return Outcome(addr == "c:1", addr, "" if addr == "c:1" else "exchange deadline passed")

    agent.exchanger.exchange = exchange  # type: ignore[method-assign]

    async def rounds(n):
        for _ in range(n):
            await agent.gossip_round()

    for _ in range(3):  # until each failing neighbour has failed once
        asyncio.run(rounds(1))
        if {"a:1", "b:1"} <= set(tried):
            break
    assert {"a:1", "b:1"} <= set(tried)
    tried.clear()
    asyncio.run(rounds(5))
    # From then on the reachable neighbour is tried first: no round waits on the others.
    assert tried == ["c:1"] * 5
    assert all(agent._unreachable[a][1] >= 1.0 for a in ("a:1", "b:1"))
