"""Member meta on the SWIM state machine: a member's word about itself (its phase), spread
with its alive claims under a new incarnation, checked like every other field."""

from __future__ import annotations

import random
from typing import Any

import msgpack

from p2p.swim import MAX_META, Swim, SwimConfig

LAN = SwimConfig.lan()


def addr(name: str) -> str:
    return f"{name}.test:7946"


def wire(msg: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(msg), raw=False)


def cluster(names: str) -> dict[str, Swim]:
    swims = {n: Swim(n, addr(n), LAN, random.Random(i), 0.0) for i, n in enumerate(names)}
    for s in swims.values():
        s.preload([(n, addr(n), 0) for n in names], 0.0)
    return swims


def settle(swims: dict[str, Swim], until: float, step: float = 0.05) -> None:
    """Tick everyone and deliver every message at once until ``until``."""
    by_addr = {s.addr: s for s in swims.values()}
    now = 0.0
    while now < until:
        now += step
        pending = [out for s in swims.values() for out in s.tick(now)]
        while pending:
            dst, msg = pending.pop(0)
            target = by_addr.get(dst)
            if target is not None:
                pending += target.on_message(wire(msg), now)


def meta_seen(swims: dict[str, Swim], about: str) -> dict[str, str]:
    return {
        n: next(m.meta for m in s.members() if m.name == about)
        for n, s in swims.items()
        if n != about
    }


def test_set_meta_reaches_every_member_with_a_new_incarnation() -> None:
    swims = cluster("abcde")
    before = swims["a"].incarnation
    swims["a"].set_meta("finished")
    assert swims["a"].incarnation == before + 1 and swims["a"].meta == "finished"
    settle(swims, 5.0)
    assert meta_seen(swims, "a") == dict.fromkeys("bcde", "finished")
    events = [e for e in swims["b"].drain_events() if e.get("kind") == "meta"]
    assert events and events[0]["meta"] == "finished" and events[0]["subject"] == "a"


def test_meta_survives_a_refutation_and_full_state_sync() -> None:
    swims = cluster("abc")
    swims["a"].set_meta("finished")
    # A suspicion of "a" makes it refute with a higher incarnation: the meta must stay.
    swims["a"].on_message(
        wire(
            {
                "type": "gossip",
                "from": "b",
                "addr": addr("b"),
                "updates": [{"kind": "suspect", "name": "a", "inc": 1, "by": "b"}],
            }
        ),
        0.0,
    )
    assert swims["a"].incarnation == 2 and swims["a"].meta == "finished"
    settle(swims, 5.0)
    assert meta_seen(swims, "a") == {"b": "finished", "c": "finished"}
    # A newcomer learns it from a full-state push-pull, not from gossip it never saw.
    d = Swim("d", addr("d"), LAN, random.Random(9), 5.0)
    outs = d.join([addr("a")], 5.0)
    by_addr = {s.addr: s for s in (*swims.values(), d)}
    pending = list(outs)
    while pending:
        dst, msg = pending.pop(0)
        pending += by_addr[dst].on_message(wire(msg), 5.0)
    assert {m.name: m.meta for m in d.members()}["a"] == "finished"


def test_an_old_claim_cannot_undo_meta_and_bad_meta_is_dropped() -> None:
    swims = cluster("ab")
    swims["a"].set_meta("finished")
    settle(swims, 3.0)
    b = swims["b"]
    # An alive claim at the old incarnation without meta is stale: ignored.
    b.on_message(wire({"type": "gossip", "from": "a", "addr": addr("a"), "inc": 0}), 3.0)
    assert meta_seen(swims, "a") == {"b": "finished"}
    # Meta that is not a short string is refused like any malformed field.
    for bad in (7, "x" * (MAX_META + 1), ["finished"]):
        out = b.on_message(
            wire({"type": "gossip", "from": "a", "addr": addr("a"), "inc": 5, "meta": bad}), 3.0
        )
        assert out == []
    assert b.rejected["bad field 'meta'"] == 3
    assert meta_seen(swims, "a") == {"b": "finished"}
