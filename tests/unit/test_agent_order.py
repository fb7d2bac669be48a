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


def _busy_agent(busy_calls: int, retries: int = 16):
    from gossip.policy import ScheduleConfig

    cfg = AgentConfig(seed=1, schedule=ScheduleConfig(busy_retries=retries))
    agent = Agent(cfg, ArrayStore(np.zeros(4)), TcpTransport())
    agent.membership = Members(["a:1", "b:1", "c:1"])  # type: ignore[assignment]
    agent.status = "training"
    tried = []

    async def exchange(addr):
        tried.append(addr)
        ok = len(tried) > busy_calls
        return Outcome(ok, addr, "" if ok else "busy", busy=not ok)

    agent.exchanger.exchange = exchange  # type: ignore[method-assign]
    return agent, tried


def test_a_round_that_found_only_busy_neighbours_is_tried_again_within_its_period():
    from gossip.policy import CpuBudget

    # Every neighbour busy for the first 7 offers (two rounds and one more): the period's
    # exchange still happens, without waiting for the next period's kick.
    agent, tried = _busy_agent(busy_calls=7)
    asyncio.run(agent._period_round(CpuBudget(0.0)))
    assert len(tried) == 8
    assert agent._partnered == {tried[-1]}
    # Without retries a busy round gives its period up (as every round did before).
    agent, tried = _busy_agent(busy_calls=7, retries=0)
    asyncio.run(agent._period_round(CpuBudget(0.0)))
    assert len(tried) == 3 and not agent._partnered


def test_busy_retries_stop_once_a_neighbour_began_an_exchange_with_us():
    from gossip.policy import CpuBudget

    agent, tried = _busy_agent(busy_calls=100)
    real = agent.exchanger.exchange

    async def exchange(addr):
        out = await real(addr)
        if len(tried) == 4:
            agent.exchanger.begun += 1  # a neighbour's offer to us was accepted meanwhile
        return out

    agent.exchanger.exchange = exchange  # type: ignore[method-assign]
    asyncio.run(agent._period_round(CpuBudget(0.0)))
    assert len(tried) == 6  # the round in which it began ends; no further round
    assert not agent._partnered


def test_a_round_we_cannot_take_part_in_tries_nobody_and_reports_busy():
    agent, tried = _busy_agent(busy_calls=0)
    agent.exchanger.ready = False  # catching up
    assert asyncio.run(agent.gossip_round()) is True
    assert tried == []
