"""Tier 1: the SWIM state machine on a fake clock, message by message."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Any

import msgpack
import pytest

from p2p.swim import MAX_NAME, Out, State, Swim, SwimConfig

LAN = SwimConfig.lan()


def addr(name: str) -> str:
    return f"{name}.test:7946"


def node(name: str, cfg: SwimConfig = LAN, now: float = 0.0, inc: int = 0, seed: int = 0) -> Swim:
    return Swim(name, addr(name), cfg, random.Random(seed), now, inc)


def cluster(names: str, cfg: SwimConfig = LAN, now: float = 0.0) -> dict[str, Swim]:
    """Peers named by single letters that already know each other (incarnation 0)."""
    swims = {n: node(n, cfg, now, seed=i) for i, n in enumerate(names)}
    for s in swims.values():
        s.preload([(n, addr(n), 0) for n in names], now)
    return swims


def wire(msg: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(msg), raw=False)


def deliver(
    swims: dict[str, Swim], outs: list[Out], now: float, drop: set[str] | None = None
) -> list[Out]:
    """Deliver messages and every reply they cause, instantly, until quiet. Messages to a
    name in ``drop`` (or to an unknown address) are lost. Returns all sent, lost ones too."""
    by_addr = {s.addr: s for s in swims.values()}
    drop_addrs = {addr(n) for n in drop or ()}
    pending, sent = list(outs), []
    while pending:
        dst, msg = pending.pop(0)
        sent.append((dst, msg))
        target = by_addr.get(dst)
        if target is not None and dst not in drop_addrs:
            pending += target.on_message(wire(msg), now)
    return sent


def run(
    swims: dict[str, Swim],
    name: str,
    until: float,
    drop: set[str] | None = None,
    now: float = 0.0,
) -> list[dict[str, Any]]:
    """Tick one peer at each of its deadlines from ``now`` up to ``until``; return its events.
    A deadline already in the past runs at ``now``: the clock never goes backwards."""
    s = swims[name]
    while (t := max(now, s.next_deadline())) <= until:
        deliver(swims, s.tick(t), t, drop)
        now = t
    return s.drain_events()


def first_ping(
    swims: dict[str, Swim], name: str, drop: set[str] | None = None
) -> tuple[str, float]:
    """Tick ``name`` until it sends a ping; return (target, time) without delivering the ping."""
    s = swims[name]
    for _ in range(100):
        t = s.next_deadline()
        outs = s.tick(t)
        pings = [m for _, m in outs if m["type"] == "ping"]
        rest = [o for o in outs if o[1]["type"] != "ping"]
        deliver(swims, rest, t, drop)
        if pings:
            return pings[0]["target"], t
    raise AssertionError("no probe")


def of_type(outs: list[Out], kind: str) -> list[Out]:
    return [o for o in outs if o[1]["type"] == kind]


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["kind"], e["subject"]) for e in events]


def env(sender: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A message from ``sender``; without ``inc=`` it makes no claim about the sender."""
    return {"type": kind, "from": sender, "addr": addr(sender), **fields}


# -- config ------------------------------------------------------------------------------


def test_profiles_build_and_order() -> None:
    local, lan, wan, test = (
        SwimConfig.local(),
        SwimConfig.lan(),
        SwimConfig.wan(),
        SwimConfig.test(),
    )
    assert test.probe_interval < local.probe_interval < lan.probe_interval < wan.probe_interval
    assert lan.probe_timeout == 0.5 and lan.gossip_interval == 0.2 and lan.gossip_nodes == 3
    for cfg in (local, lan, wan, test):
        assert cfg.probe_timeout * 2 <= cfg.probe_interval


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="half"):
        dataclasses.replace(LAN, probe_timeout=0.8)
    with pytest.raises(ValueError, match="gossip_nodes"):
        dataclasses.replace(LAN, gossip_nodes=0)
    with pytest.raises(ValueError):
        dataclasses.replace(LAN, probe_interval=0)


def test_scaling_formulas_match_memberlist() -> None:
    assert LAN.suspicion_timeouts(1) == (4.0, 24.0)
    assert LAN.suspicion_timeouts(100) == (8.0, 48.0)
    assert LAN.retransmit_limit(9) == 4
    assert LAN.retransmit_limit(100) == 12
    assert LAN.push_pull_period(32) == 30.0
    assert LAN.push_pull_period(1000) == 180.0


# -- join --------------------------------------------------------------------------------


def test_join_by_push_pull() -> None:
    swims = {"a": node("a"), "b": node("b", seed=1)}
    outs = swims["b"].join([addr("a"), addr("b")], now=1.0)
    assert [dst for dst, _ in outs] == [addr("a")]  # never to ourselves
    assert outs[0][1]["type"] == "push_pull" and outs[0][1]["join"] is True
    deliver(swims, outs, 1.0)
    assert swims["b"].joined() and not swims["a"].joined()
    assert [m.name for m in swims["a"].alive()] == ["b"]
    assert [m.name for m in swims["b"].alive()] == ["a"]
    (event,) = swims["a"].drain_events()
    assert event == {
        "t": 1.0,
        "kind": "joined",
        "subject": "b",
        "addr": addr("b"),
        "incarnation": 0,
    }


def test_join_repeats_until_a_seed_answers() -> None:
    b = node("b")
    outs = b.join([addr("a")], now=0.0)
    assert len(of_type(outs, "push_pull")) == 1
    assert b.next_deadline() <= LAN.probe_interval
    retry = of_type(b.tick(LAN.probe_interval), "push_pull")
    assert [dst for dst, _ in retry] == [addr("a")]
    a = node("a", seed=1)
    reply = a.on_message(wire(retry[0][1]), 1.0)
    b.on_message(wire(reply[0][1]), 1.0)
    assert b.joined()
    later = b.tick(LAN.probe_interval * 2)
    assert not [m for dst, m in later if m["type"] == "push_pull" and m["join"]]


def test_rejoin_reaches_out_again_after_a_join() -> None:
    # Two peers that each started alone (a DNS name listed only themselves) merge once one
    # of them joins again through the other's fresh address.
    swims = {"a": node("a"), "b": node("b", seed=1)}
    deliver(swims, swims["b"].join([addr("c")], 0.0), 0.0, drop={"c"})
    assert not swims["b"].rejoin([addr("b")], 1.0)  # only ourselves: nothing to send
    outs = swims["b"].rejoin([addr("a")], 1.0)
    assert [dst for dst, m in outs if m["type"] == "push_pull" and m["join"]] == [addr("a")]
    deliver(swims, outs, 1.0)
    assert swims["b"].joined()
    assert [m.name for m in swims["a"].alive()] == ["b"]
    assert [m.name for m in swims["b"].alive()] == ["a"]


def test_lonely_peer_falls_back_to_seeds() -> None:
    cfg = dataclasses.replace(LAN, push_pull_interval=5.0)
    swims = {"a": node("a", cfg), "b": node("b", cfg, seed=1)}
    deliver(swims, swims["b"].join([addr("a")], 0.0), 0.0)
    gone = env("a", "gossip", updates=[{"kind": "left", "name": "a", "inc": 0}])
    swims["b"].on_message(gone, 1.0)  # a left: b is alone now
    outs = swims["b"].tick(20.0)
    assert [dst for dst, m in outs if m["type"] == "push_pull"] == [addr("a")]


# -- probing -----------------------------------------------------------------------------


def test_probe_ack_keeps_everyone_alive() -> None:
    swims = cluster("ab")
    events = run(swims, "a", 30.0)
    assert events == []
    assert swims["a"].health == 0
    assert swims["a"].state_of("b") == State.ALIVE


def test_missed_ack_then_indirect_then_suspect_then_dead() -> None:
    swims = cluster("abcd")
    a = swims["a"]
    target, start = first_ping(swims, "a")
    helpers = sorted(set("bcd") - {target})
    # No direct ack: at the probe timeout, ping_req to the other members.
    outs = a.tick(start + LAN.probe_timeout)
    reqs = of_type(outs, "ping_req")
    assert sorted(dst for dst, _ in reqs) == [addr(h) for h in helpers]
    assert reqs[0][1]["target"] == target and reqs[0][1]["nack"] is True
    relayed = deliver(swims, outs, start + LAN.probe_timeout, drop={target})
    assert len(of_type(relayed, "ping")) == 2  # each helper pinged the target itself
    # Nobody answers by the end of the interval: suspect, with the helpers' silence
    # (no nacks either) counted against our own health.
    run(swims, "a", start + LAN.probe_interval - 0.01, drop={target}, now=start + 0.5)
    assert a.state_of(target) == State.ALIVE
    outs = a.tick(start + LAN.probe_interval)
    assert a.state_of(target) == State.SUSPECT
    assert a.health == 2
    deliver(swims, outs, start + LAN.probe_interval, drop={target})
    assert ("suspect", target) in kinds(a.drain_events())
    # Four members, k = 2 confirmations wanted, none came: the maximum applies.
    low, high = LAN.suspicion_timeouts(4)
    suspected = start + LAN.probe_interval
    assert kinds(run(swims, "a", suspected + high - 0.01, {target}, suspected)) == []
    # The timer ran out: a last call to the target, carrying the suspicion, then the verdict.
    verdict = suspected + high + LAN.probe_timeout * (a.health + 1)
    outs = a.tick(suspected + high)
    (call,) = [m for dst, m in of_type(outs, "ping") if dst == addr(target)]
    assert call["updates"][0] == {"kind": "suspect", "name": target, "inc": 0, "by": "a"}
    deliver(swims, outs, suspected + high, drop={target})
    assert kinds(run(swims, "a", verdict - 0.01, {target}, suspected + high)) == []
    events = run(swims, "a", verdict, drop={target}, now=verdict - 0.01)
    assert kinds(events) == [("declared_dead", target)]
    assert events[0]["by"] == "a" and events[0]["t"] == pytest.approx(verdict)
    assert a.state_of(target) == State.DEAD
    assert target not in a.live_names()


def test_confirmations_shrink_the_suspicion_timeout() -> None:
    swims = cluster("abcd")
    a = swims["a"]
    target, start = first_ping(swims, "a")
    others = sorted(set("bcd") - {target})
    run(swims, "a", start + LAN.probe_interval, drop={target}, now=start)
    t0 = start + LAN.probe_interval
    assert a.state_of(target) == State.SUSPECT
    low, high = LAN.suspicion_timeouts(4)

    def confirm(by: str, t: float) -> None:
        msg = env(by, "gossip", updates=[{"kind": "suspect", "name": target, "inc": 0, "by": by}])
        a.on_message(wire(msg), t)

    confirm(others[0], t0 + 0.1)
    confirm(others[0], t0 + 0.2)  # the same confirmer twice counts once
    one = t0 + high - (high - low) * math.log(2) / math.log(3)
    assert kinds(run(swims, "a", one - 0.01, drop={target}, now=t0 + 0.2)) == []
    confirm(others[1], one - 0.01)  # k = 2 reached: the minimum, already passed -> now
    verdict = one - 0.01 + LAN.probe_timeout * (a.health + 1)
    outs = a.tick(one - 0.01)
    assert [m["target"] for dst, m in of_type(outs, "ping") if dst == addr(target)] == [target]
    events = run(swims, "a", verdict, drop={target}, now=one - 0.01)
    assert kinds(events) == [("declared_dead", target)]
    assert events[0]["t"] == pytest.approx(verdict)


def test_indirect_ack_is_relayed_and_saves_the_target() -> None:
    swims = cluster("abc")
    a = swims["a"]
    target, start = first_ping(swims, "a")
    # The direct path a -> target is broken; the path through the helper works.
    outs = a.tick(start + LAN.probe_timeout)
    (req,) = of_type(outs, "ping_req")
    helper = swims[[n for n in "bc" if n != target][0]]
    (ping,) = helper.on_message(wire(req[1]), start + 0.6)
    assert ping[0] == addr(target) and ping[1]["target"] == target
    (ack,) = swims[target].on_message(wire(ping[1]), start + 0.6)
    (relayed,) = helper.on_message(wire(ack[1]), start + 0.6)
    assert relayed[0] == addr("a") and relayed[1]["seq"] == req[1]["seq"]
    a.on_message(wire(relayed[1]), start + 0.61)
    events = run(swims, "a", start + LAN.probe_interval, drop={target}, now=start + 0.61)
    assert ("suspect", target) not in kinds(events)
    assert a.health == 0


def test_helper_nacks_when_the_target_stays_silent() -> None:
    swims = cluster("abc")
    req = env("a", "ping_req", seq=77, target="b", target_addr=addr("b"), nack=True)
    outs = swims["c"].on_message(wire(req), 10.0)
    assert of_type(outs, "ping")
    assert not of_type(swims["c"].tick(10.0 + 0.8 * LAN.probe_timeout - 0.01), "nack")
    nacks = of_type(swims["c"].tick(10.0 + 0.8 * LAN.probe_timeout), "nack")
    assert nacks == [(addr("a"), env("c", "nack", seq=77, inc=0))]


def test_nacks_spare_our_own_health() -> None:
    swims = cluster("abcd")
    a = swims["a"]
    target, start = first_ping(swims, "a")
    outs = a.tick(start + LAN.probe_timeout)
    for dst, req in of_type(outs, "ping_req"):
        helper = dst.split(".")[0]
        a.on_message(env(helper, "nack", seq=req["seq"]), start + 0.9)
    a.tick(start + LAN.probe_interval)
    assert a.state_of(target) == State.SUSPECT
    assert a.health == 0  # the helpers answered: the target is the problem, not us


def test_health_stretches_probe_timeouts() -> None:
    swims = cluster("abc")
    a = swims["a"]
    a.set_health(3)
    target, start = first_ping(swims, "a")
    assert not of_type(a.tick(start + 4 * LAN.probe_timeout - 0.01), "ping_req")
    a.set_health(100)  # clamped to awareness_max_multiplier - 1
    assert a.health == LAN.awareness_max_multiplier - 1
    assert not of_type(a.tick(start + 8 * LAN.probe_timeout - 0.01), "ping_req")
    assert of_type(a.tick(start + 8 * LAN.probe_timeout), "ping_req")
    # The whole interval stretches too: no verdict before 8 intervals.
    a.tick(start + 8 * LAN.probe_interval - 0.01)
    assert a.state_of(target) == State.ALIVE
    a.tick(start + 8 * LAN.probe_interval)
    assert a.state_of(target) == State.SUSPECT


def test_ping_to_a_suspect_carries_the_suspicion_first() -> None:
    swims = cluster("ab")
    a = swims["a"]
    msg = env("c", "gossip", updates=[{"kind": "suspect", "name": "b", "inc": 0, "by": "c"}])
    a.on_message(msg, 0.0)
    for _ in range(10):
        t = a.next_deadline()
        pings = of_type(a.tick(t), "ping")
        if pings:
            break
    first = pings[0][1]["updates"][0]
    assert first == {"kind": "suspect", "name": "b", "inc": 0, "by": "a"}
    (ack,) = swims["b"].on_message(wire(pings[0][1]), t)
    assert swims["b"].incarnation == 1  # b refuted at once


def test_last_call_saves_a_member_whose_refutation_was_missed() -> None:
    swims = cluster("ab")
    a, b = swims["a"], swims["b"]
    suspicion = env("c", "gossip", updates=[{"kind": "suspect", "name": "b", "inc": 0, "by": "c"}])
    a.on_message(wire(suspicion), 0.0)
    b.on_message(wire(suspicion), 0.0)  # b refutes, but the news never reaches a
    assert b.incarnation == 1 and a.state_of("b") == State.SUSPECT
    low, _ = LAN.suspicion_timeouts(2)  # two members: no confirmations wanted, the minimum
    a.drain_events()
    events = run(swims, "a", low + 5.0, drop=set())
    assert kinds(events) == [("alive", "b")]
    assert a.state_of("b") == State.ALIVE and a.alive()[0].incarnation == 1


def test_a_member_we_hold_dead_learns_it_from_our_ack() -> None:
    swims = cluster("ab")
    a, b = swims["a"], swims["b"]
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "c"}]), 1
    )
    (ack,) = a.on_message(wire(env("b", "ping", seq=5, target="a", updates=[])), 2.0)
    assert ack[1]["updates"][0] == {"kind": "dead", "name": "b", "inc": 0, "by": "a"}
    (answer,) = b.on_message(wire(ack[1]), 2.0)
    assert answer[0] == addr("a") and b.incarnation == 1
    a.on_message(wire(answer[1]), 2.0)
    assert a.state_of("b") == State.ALIVE


def test_every_message_speaks_for_its_sender() -> None:
    a = node("a")
    a.on_message(wire(env("z", "ping", seq=1, target="a", updates=[], inc=3)), 1.0)
    assert [(m.name, m.incarnation) for m in a.alive()] == [("z", 3)]
    assert kinds(a.drain_events()) == [("joined", "z")]
    # The same incarnation cannot clear a suspicion; a higher one can.
    suspect = {"kind": "suspect", "name": "z", "inc": 3, "by": "c"}
    a.on_message(env("c", "gossip", updates=[suspect]), 2.0)
    a.on_message(wire(env("z", "gossip", updates=[], inc=3)), 2.1)
    assert a.state_of("z") == State.SUSPECT
    a.on_message(wire(env("z", "gossip", updates=[], inc=4)), 2.2)
    assert a.state_of("z") == State.ALIVE


def test_ping_for_another_name_is_not_answered() -> None:
    b = node("b")
    assert b.on_message(env("a", "ping", seq=1, target="old-b", updates=[]), 0.0) == []
    assert b.rejected["ping for another name"] == 1


# -- suspicion, refutation, incarnations ---------------------------------------------------


def test_refutes_suspicion_of_itself() -> None:
    swims = cluster("ab")
    b = swims["b"]
    msg = env("c", "gossip", updates=[{"kind": "suspect", "name": "b", "inc": 0, "by": "c"}])
    b.on_message(wire(msg), 1.0)
    assert b.incarnation == 1 and b.health == 1  # Lifeguard: suspected -> maybe we are slow
    swims["a"].on_message(wire(msg), 1.0)
    assert swims["a"].state_of("b") == State.SUSPECT
    t = 1.0
    while not (gossip := of_type(b.tick(t), "gossip")):
        t = max(t, b.next_deadline())
    assert gossip[0][1]["updates"][0] == {"kind": "alive", "name": "b", "addr": addr("b"), "inc": 1}
    swims["a"].on_message(wire(gossip[0][1]), t)
    assert swims["a"].state_of("b") == State.ALIVE
    alive = [e for e in swims["a"].drain_events() if e["kind"] == "alive"]
    assert alive[0]["subject"] == "b" and alive[0]["previous"] == "suspect"
    assert alive[0]["incarnation"] == 1


def test_refutes_death_of_itself_from_full_state() -> None:
    b = node("b", inc=4)
    pp = env("a", "push_pull", members=[["b", addr("b"), 6, int(State.DEAD)]], reply=True)
    b.on_message(wire(pp), 0.0)
    assert b.incarnation == 7


def test_stale_incarnations_are_ignored() -> None:
    a = node("a")
    a.preload([("b", addr("b"), 5)], 0.0)
    stale = [
        {"kind": "suspect", "name": "b", "inc": 4, "by": "c"},
        {"kind": "dead", "name": "b", "inc": 3, "by": "c"},
        {"kind": "alive", "name": "b", "addr": addr("b"), "inc": 5},
        {"kind": "left", "name": "b", "inc": 2},
    ]
    a.on_message(env("c", "gossip", updates=stale), 1.0)
    assert a.state_of("b") == State.ALIVE and a.drain_events() == []
    assert sum(a.rejected.values()) == 0  # stale is normal, not an error


def test_suspect_about_an_unknown_member_is_ignored() -> None:
    a = node("a")
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "z", "inc": 9, "by": "c"}]), 0
    )
    assert a.state_of("z") is None and a.drain_events() == []


# -- leaving and rejoining -------------------------------------------------------------


def test_graceful_leave_is_left_not_dead() -> None:
    swims = cluster("abc")
    b = swims["b"]
    outs = b.leave(5.0)
    assert outs and all(m["type"] == "gossip" for _, m in outs)
    assert b.leave(5.0) == []  # idempotent
    deliver(swims, outs, 5.0)
    for name in "ac":
        assert swims[name].state_of("b") == State.LEFT
        evs = swims[name].drain_events()
        assert kinds(evs) == [("left", "b")] and evs[0]["t"] == 5.0
    # b no longer probes, and does not refute news of its departure.
    for _ in range(40):
        t = b.next_deadline()
        assert not of_type(b.tick(t), "ping")
    b.on_message(
        env("a", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "a"}]), t
    )
    assert b.incarnation == 0
    assert b.leave_done()


def test_restart_with_higher_incarnation_comes_back() -> None:
    swims = cluster("ab")
    a = swims["a"]
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "c"}]), 1
    )
    assert a.state_of("b") == State.DEAD
    # A restart under the same incarnation is not believed by itself ...
    same = node("b", now=2.0, inc=0, seed=5)
    outs = same.join([addr("a")], 2.0)
    (reply,) = a.on_message(wire(outs[0][1]), 2.0)
    assert a.state_of("b") == State.DEAD
    # ... but the reply tells it that it is dead, it refutes, and says so to a directly.
    (answer,) = same.on_message(wire(reply[1]), 2.0)
    assert same.incarnation == 1 and answer[0] == addr("a")
    a.on_message(wire(answer[1]), 2.0)
    assert a.state_of("b") == State.ALIVE
    back = [e for e in a.drain_events() if e["kind"] == "alive"]
    assert back[-1]["subject"] == "b" and back[-1]["previous"] == "dead"
    assert back[-1]["incarnation"] == 1
    # A restart that raised its incarnation is believed at once.
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 1, "by": "c"}]), 3
    )
    fresh = node("b", now=3.0, inc=7, seed=6)
    deliver({"a": a, "b": fresh}, fresh.join([addr("a")], 3.0), 3.0)
    assert a.state_of("b") == State.ALIVE and a.alive()[0].incarnation == 7


def test_new_address_only_after_the_old_one_is_dead() -> None:
    a = node("a")
    a.preload([("b", addr("b"), 0)], 0.0)
    moved = {"kind": "alive", "name": "b", "addr": "elsewhere:1", "inc": 3}
    a.on_message(env("c", "gossip", updates=[moved]), 1.0)
    assert [m.addr for m in a.alive()] == [addr("b")]
    assert a.rejected["name claimed from another address"] == 1
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "c"}]), 2
    )
    a.on_message(env("c", "gossip", updates=[moved]), 3.0)
    assert [(m.addr, m.incarnation) for m in a.alive()] == [("elsewhere:1", 3)]


def test_dead_members_are_reaped() -> None:
    cfg = dataclasses.replace(LAN, reap_after=100.0)
    swims = cluster("abc", cfg)
    a = swims["a"]
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "c"}]), 1
    )
    run(swims, "a", 50.0, drop={"b"})
    assert a.state_of("b") == State.DEAD
    run(swims, "a", 110.0, drop={"b"}, now=50.0)
    assert a.state_of("b") is None


def test_push_pull_tries_dead_members_to_heal_partitions() -> None:
    cfg = dataclasses.replace(LAN, push_pull_interval=1.0)
    a = node("a", cfg)
    a.preload([("b", addr("b"), 0)], 0.0)
    a.on_message(
        env("c", "gossip", updates=[{"kind": "dead", "name": "b", "inc": 0, "by": "c"}]), 0
    )
    t, targets = 0.0, []
    while t < 10.0:
        t = a.next_deadline()
        targets += [dst for dst, m in a.tick(t) if m["type"] == "push_pull"]
    assert targets and set(targets) == {addr("b")}


# -- dissemination ---------------------------------------------------------------------


def test_updates_are_retransmitted_lambda_log_n_times() -> None:
    names = "abcdefghijkl"
    swims = cluster(names)
    a = swims["a"]
    a.on_message(env("b", "gossip", updates=[{"kind": "left", "name": "c", "inc": 0}]), 0.0)
    carried = 0
    t = 0.0
    while t < 20.0:
        t = a.next_deadline()
        outs = a.tick(t)
        for _, m in outs:
            carried += sum(u["name"] == "c" for u in m.get("updates", []))
        deliver(swims, outs, t)
    assert a.num_live() == 11
    assert carried == LAN.retransmit_limit(11) == 8  # 4 * ceil(log10(12))
    assert a.broadcasts_pending() == 0


def test_gossip_fans_out_to_gossip_nodes() -> None:
    swims = cluster("abcdefgh")
    a = swims["a"]
    a.on_message(env("b", "gossip", updates=[{"kind": "left", "name": "c", "inc": 0}]), 0.0)
    t = a.next_deadline()
    while not (outs := of_type(a.tick(t), "gossip")):
        t = a.next_deadline()
    assert len({dst for dst, _ in outs}) == LAN.gossip_nodes


def test_every_output_is_msgpack_safe() -> None:
    swims = cluster("abcde")
    for t10 in range(0, 400):
        t = t10 / 10
        for s in swims.values():
            if s.next_deadline() <= t:
                for dst, msg in s.tick(t):
                    assert wire(msg) == msg
                    assert isinstance(dst, str)
                    deliver(swims, [(dst, msg)], t, drop={"e"})
    assert all(s.state_of("e") == State.DEAD for n, s in swims.items() if n != "e")


# -- bad input -------------------------------------------------------------------------

GOOD = env("x", "gossip", updates=[])
# What msgpack decodes from 1000 nested one-element arrays: too deep for repr() (found by
# benchmarks/fuzz.py: the rejection's log detail raised RecursionError out of on_message).
DEEP = msgpack.unpackb(b"\x91" * 1000 + b"\x80")
BAD: list[tuple[Any, str]] = [
    (None, "message is not a map"),
    ({**GOOD, "inc": -1}, "bad field 'inc'"),
    ({**GOOD, "inc": "7"}, "bad field 'inc'"),
    (b"\x00\x01", "message is not a map"),
    ([1, 2], "message is not a map"),
    ({}, "bad field 'type'"),
    ({**GOOD, "type": "teleport"}, "unknown message type"),
    ({**GOOD, "from": ""}, "bad field 'from'"),
    ({**GOOD, "from": "x" * (MAX_NAME + 1)}, "bad field 'from'"),
    ({**GOOD, "addr": 5}, "bad field 'addr'"),
    ({**GOOD, "from": "a"}, "message claims our own name"),
    ({**GOOD, "updates": "nope"}, "bad field 'updates'"),
    ({**GOOD, "updates": [5]}, "bad update"),
    ({**GOOD, "updates": [{"kind": "zombie", "name": "z", "inc": 1}]}, "unknown update kind"),
    ({**GOOD, "updates": [{"kind": "alive", "name": "z", "inc": 1}]}, "bad field 'addr'"),
    (
        {**GOOD, "updates": [{"kind": "alive", "name": "z", "addr": "z:1", "inc": -1}]},
        "bad field 'inc'",
    ),
    (
        {**GOOD, "updates": [{"kind": "alive", "name": "z", "addr": "z:1", "inc": 2**64}]},
        "bad field 'inc'",
    ),
    (
        {**GOOD, "updates": [{"kind": "alive", "name": "z", "addr": "z:1", "inc": 1.5}]},
        "bad field 'inc'",
    ),
    (
        {**GOOD, "updates": [{"kind": "suspect", "name": "z", "inc": True, "by": "x"}]},
        "bad field 'inc'",
    ),
    (env("x", "ping", seq=-3, target="a"), "bad field 'seq'"),
    (env("x", "ping", target="a"), "bad field 'seq'"),
    (env("x", "ack", seq="1"), "bad field 'seq'"),
    (env("x", "ping_req", seq=1, target="b"), "bad field 'target_addr'"),
    (env("x", "ping_req", seq=1, target="a", target_addr="a:1"), "ping_req about ourselves"),
    (env("x", "ping_req", seq=1, target="b", target_addr="b:1", nack="yes"), "bad field 'nack'"),
    (env("x", "push_pull", members={"b": 1}), "bad field 'members'"),
    (env("x", "push_pull", members=[["b", "b:1", 0]]), "bad member entry"),
    (env("x", "push_pull", members=[["b", "b:1", 0, 9]]), "bad field 'state'"),
    (env("x", "push_pull", members=[], reply="no"), "bad field 'reply'"),
    ({**GOOD, "type": DEEP}, "bad field 'type'"),
    ({**GOOD, "from": DEEP}, "bad field 'from'"),
    ({**GOOD, "inc": DEEP}, "bad field 'inc'"),
    ({**GOOD, "meta": DEEP}, "bad field 'meta'"),
    ({**GOOD, "type": [DEEP]}, "bad field 'type'"),
    (env("x", "ping", seq=DEEP, target="a"), "bad field 'seq'"),
    (env("x", "ping_req", seq=1, target="b", target_addr="b:1", nack=DEEP), "bad field 'nack'"),
    ({**GOOD, "updates": [{"kind": DEEP, "name": "z", "inc": 1}]}, "unknown update kind"),
    (env("x", "push_pull", members=[DEEP]), "bad member entry"),
    (env("x", "push_pull", members=[["b", "b:1", 0, 0, DEEP]]), "bad field 'meta'"),
]


@pytest.mark.parametrize(("msg", "category"), BAD)
def test_bad_input_is_dropped_and_counted(msg: Any, category: str) -> None:
    swims = cluster("ab")
    a = swims["a"]
    before = [(m.name, m.incarnation, m.state) for m in a.members()]
    assert a.on_message(msg, 1.0) == []
    assert a.rejected == {category: 1}
    assert [(m.name, m.incarnation, m.state) for m in a.members()] == before
    assert a.drain_events() == []


def test_a_bad_update_spoils_the_whole_message() -> None:
    a = node("a")
    ups = [{"kind": "alive", "name": "z", "addr": "z:1", "inc": 1}, {"kind": "alive"}]
    a.on_message(env("x", "gossip", updates=ups), 0.0)
    assert a.state_of("z") is None


def test_each_kind_of_problem_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    a = node("a")
    with caplog.at_level(logging.DEBUG, logger="p2p.swim"):
        for _ in range(5):
            a.on_message({**GOOD, "type": "teleport"}, 0.0)
        a.on_message("junk", 0.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert a.rejected == {"unknown message type": 5, "message is not a map": 1}


def test_the_log_line_of_a_deep_or_huge_value_is_short(caplog: pytest.LogCaptureFixture) -> None:
    a = node("a")
    with caplog.at_level(logging.WARNING, logger="p2p.swim"):
        assert a.on_message({**GOOD, "from": DEEP}, 0.0) == []
        assert a.on_message({**GOOD, "addr": "y" * 1_000_000}, 0.0) == []
    assert len(caplog.records) == 2
    assert all(len(r.getMessage()) < 200 for r in caplog.records)


def test_a_flood_of_updates_is_bounded() -> None:
    a = node("a")
    flood = [
        {"kind": "alive", "name": f"n{i}", "addr": f"10.0.{i // 250}.{i % 250}:1", "inc": 0}
        for i in range(10_000)
    ]
    a.on_message(env("x", "gossip", updates=flood), 0.0)
    assert len(a.alive()) == LAN.max_piggyback
    assert a.rejected["too many updates in one message"] == 1


def test_member_list_over_the_limit_is_refused() -> None:
    cfg = dataclasses.replace(LAN, max_members=8)
    a = node("a", cfg)
    big = [[f"n{i}", f"n{i}:1", 0, 0] for i in range(9)]
    assert a.on_message(env("x", "push_pull", members=big, reply=False), 0.0) == []
    assert a.state_of("n0") is None and a.rejected["member list over the limit"] == 1
    # Within the message limit, the member table still stops at max_members.
    ok = [[f"n{i}", f"n{i}:1", 0, 0] for i in range(8)]
    a.on_message(env("x", "push_pull", members=ok, reply=True), 0.0)
    assert len(a.members()) == 8 and a.rejected["member limit reached"] == 1


def test_a_peer_claiming_another_address_is_refused() -> None:
    a = node("a")
    a.preload([("b", addr("b"), 0)], 0.0)
    thief = {"kind": "alive", "name": "mallory", "addr": addr("b"), "inc": 0}
    a.on_message(env("x", "gossip", updates=[thief]), 0.0)
    assert a.state_of("mallory") is None
    assert a.rejected["address claimed by another name"] == 1
    ours = {"kind": "alive", "name": "mallory", "addr": addr("a"), "inc": 0}
    a.on_message(env("x", "gossip", updates=[ours]), 0.0)
    assert a.state_of("mallory") is None


def test_a_peer_claiming_our_name_is_outbid() -> None:
    a = node("a", inc=2)
    claim = {"kind": "alive", "name": "a", "addr": "mallory:1", "inc": 2}
    a.on_message(env("x", "gossip", updates=[claim]), 0.0)
    assert a.incarnation == 3
    assert a.rejected["another peer claims our name"] == 1
    assert [m.addr for m in a.members() if m.name == "a"] == [addr("a")]
    older = {"kind": "alive", "name": "a", "addr": "mallory:1", "inc": 1}
    a.on_message(env("x", "gossip", updates=[older]), 0.0)
    assert a.incarnation == 3  # an older claim loses anyway


def test_ping_req_flood_is_bounded() -> None:
    a = node("a")
    sent = 0
    for i in range(1000):
        req = env("x", "ping_req", seq=i, target=f"t{i}", target_addr=f"t{i}:1", nack=False)
        sent += len(a.on_message(req, 0.0))
    assert sent < 1000 and a.rejected["too many indirect probes in flight"] > 0


def test_random_garbage_never_raises() -> None:
    rng = random.Random(7)
    swims = cluster("ab")
    a = swims["a"]
    atoms: list[Any] = [None, True, 0, -1, 2**63, 1.5, "", "a", "b", "x", "ping", b"\xff", [], {}]
    keys = [
        "type",
        "from",
        "addr",
        "seq",
        "target",
        "target_addr",
        "nack",
        "updates",
        "members",
        "reply",
        "join",
        "kind",
        "name",
        "inc",
        "by",
        "state",
    ]

    def junk(depth: int) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.4:
            return rng.choice(atoms + keys)
        if roll < 0.6:
            return [junk(depth + 1) for _ in range(rng.randrange(5))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randrange(6))}

    for i in range(3000):
        msg = junk(0)
        if isinstance(msg, dict) and rng.random() < 0.7:
            msg.update(
                type=rng.choice(["ping", "ack", "ping_req", "nack", "gossip", "push_pull"]),
                **{"from": rng.choice(["x", "b"]), "addr": "x:1"},
            )
        outs = a.on_message(msg, float(i))
        assert all(isinstance(d, str) and isinstance(m, dict) for d, m in outs)
        a.tick(float(i))
    assert sum(a.rejected.values()) > 0


def test_join_retries_soon_then_backs_off_to_the_probe_interval() -> None:
    from p2p.swim import JOIN_RETRY_FIRST

    b = node("b")
    b.join([addr("a")], now=0.0)
    sent, t = [], 0.0
    while t < 6.0:  # nobody answers: a seed that is not up yet
        t = b.next_deadline()
        if of_type(b.tick(t), "push_pull"):
            sent.append(round(t, 6))
    gaps = [round(y - x, 6) for x, y in zip([0.0, *sent], sent, strict=False)]
    assert gaps[:3] == [JOIN_RETRY_FIRST, 2 * JOIN_RETRY_FIRST, 4 * JOIN_RETRY_FIRST]
    assert gaps == sorted(gaps) and max(gaps) == LAN.probe_interval
    assert gaps.count(LAN.probe_interval) >= 3  # then once per probe interval, no faster
