"""Failure injection without a network: faults checked against the target, the robustness report."""

from pathlib import Path

import pytest

from p2p.framing import KINDS
from trainer.chaos.driver import check_target
from trainer.chaos.report import Views, analyse_faults, first_time, stall, training_intervals
from trainer.chaos.scenario import Action, ScenarioError


def test_network_faults_without_a_network_are_refused_before_the_start():
    with pytest.raises(ScenarioError, match="partition.*--netns"):
        check_target([Action(1, "partition", groups=(("a",), ("b",)))], None, "s.toml")
    check_target([Action(1, "kill", ("a",))], None, "s.toml")


# -- the report --------------------------------------------------------------------------------


def ev(t, kind, peer=None, **kw):
    out = {"t": t, "kind": kind, **kw}
    if peer is not None:
        out["peer"] = peer
    return out


def swarm_events():
    """Three peers; b is killed at 10 and restarted; a partition {a} | {b, c} from 20 to 30."""
    events = [ev(0, "spawned", p) for p in "abc"] + [ev(1, "started", p) for p in "abc"]
    events += [ev(1.5, "joined", o, subject=s) for o in "abc" for s in "abc" if o != s]
    events += [
        ev(10, "fault", fault="kill", peers=["b"]),
        ev(10.1, "exited", "b", returncode=-9),
        ev(10.8, "suspect", "a", subject="b"),
        ev(12.0, "declared_dead", "c", subject="b"),
        ev(12.5, "spawned", "b"),
        ev(14, "listening", "b"),
        ev(14.5, "suspect", "a", subject="b"),  # about the new process: not this fault
        ev(15, "started", "b"),
        ev(15.5, "joined", "b", subject="a"),
        ev(16.0, "alive", "c", subject="b"),
        ev(16.2, "joined", "b", subject="c"),
        ev(17.0, "alive", "a", subject="b"),
        ev(20, "fault", fault="partition", groups=[["a"], ["b", "c"]]),
        ev(20.6, "suspect", "b", subject="a"),
        ev(21, "suspect", "a", subject="b"),
        ev(21.5, "suspect", "a", subject="c"),
        ev(22, "declared_dead", "c", subject="a"),
        ev(30, "fault", fault="heal"),
        ev(33, "alive", "a", subject="b"),
        ev(34, "alive", "a", subject="c"),
        ev(34.5, "alive", "b", subject="a"),
        ev(36, "alive", "c", subject="a"),
    ]
    return events


def test_detection_heal_and_split_times_come_from_the_membership_events():
    events = swarm_events()
    rows = {r["fault"]: r for r in analyse_faults(events, [], ["a", "b", "c"])}
    assert rows["kill"]["detected_s"] == pytest.approx(0.8)
    assert rows["kill"]["declared_dead_s"] == pytest.approx(2.0)
    assert rows["partition"]["detected_s"] == pytest.approx(0.6)
    assert rows["partition"]["split_s"] == pytest.approx(2.0)  # c declares a dead at 22
    assert rows["heal"]["whole_s"] == pytest.approx(6.0)  # the last view mends at 36
    assert first_time(events, 17.5, "whole") == 0.0
    assert first_time(events, 35, "whole") == pytest.approx(1.0)


def test_a_peer_that_restarts_sees_nobody_until_it_joins_again():
    views = Views()
    for e in swarm_events():
        if e["t"] > 12.5:
            break
        views.apply(e)
    assert views.views["b"] == {} and "b" not in views.live


def test_stall_is_the_others_longest_gap_while_they_train():
    events = [ev(0, "started", "a"), ev(0, "started", "b"), ev(50, "finished", "b")]
    progress = [{"t": t / 2, "peer": "a", "step": t * 10, "total": 1000} for t in range(0, 41)]
    progress += [{"t": t / 2, "peer": "b", "step": t * 10, "total": 1000} for t in range(0, 21)]
    progress += [
        {"t": 14 + t / 2, "peer": "b", "step": 200 + t * 5, "total": 1000} for t in range(0, 13)
    ]
    intervals = training_intervals(events, progress)
    s = stall(progress, intervals, 10.0, ["a", "b"], window=10.0)
    assert s["longest_gap_s"] == pytest.approx(4.0)  # b made no step from 10 to 14
    assert 0.2 < s["rate_ratio"] < 0.4  # b ran at a quarter, then half its speed
    assert stall(progress, intervals, 10.0, ["a"], window=5.0)["rate_ratio"] == 1.0


def test_the_report_shows_who_was_poisoned_when_and_what_the_others_refused():
    from trainer.chaos.report import poisoning, render_poisoning

    def peer(name, acc, poisoned=None):
        screening = {"accepted": 40, "clipped": 1, "largest_ratio": 1.7}
        return {"name": name, "metrics": {"accuracy": acc}, "poisoned": poisoned,
                "screening": screening}  # fmt: skip

    summary = {
        "peers": [peer("a", 0.91), peer("b", 0.90), peer("c", 0.10, "zero")],
        "events": [
            ev(1.0, "poison", "c", mode="zero", factor=None),
            ev(1.5, "refused", "a", subject="c", reason="far"),
            ev(1.6, "refused", "b", subject="c", reason="far"),
            ev(2.0, "refused", "a", subject="c", reason="far"),
            ev(2.5, "refused", "a", subject="c", reason="far"),
            ev(2.5, "quarantined", "a", subject="c", seconds=10.0, reason="far"),
            ev(3.0, "refused", "b", subject="a", reason="odd"),  # a false alarm
            ev(9.0, "poison", "b", mode="scale", factor=10.0),
            ev(12.0, "poison", "b", mode="none"),
        ],
    }
    p = poisoning(summary)
    rows = {r["name"]: r for r in p["peers"]}
    assert rows["c"]["poisoned"] == [{"mode": "zero", "factor": None, "from": 1.0, "until": None}]
    assert rows["b"]["poisoned"][0]["until"] == 12.0
    assert (rows["a"]["refused"], rows["a"]["quarantines"]) == (3, 1)
    assert p["by_subject"]["c"] == {"refused": 4, "quarantined": 1}
    # b's refusal of a is a refusal of an honest peer's update (a false alarm); b was
    # poisoned for a while, so b and c are left out of the honest peers' accuracy.
    assert p["honest_refused"] == 1 and p["honest_quarantined"] == 0
    assert p["honest_min"] == p["honest_mean"] == 0.91
    text = "\n".join(render_poisoning(p))
    assert "## Poisoning and robust mixing" in text and "Robust mixing on" in text
    assert "| c | 1.0-end zero | 0 | 0 | 0 |" in text
    assert "| 2.5 | a | c | 10.00 | far |" in text
    assert render_poisoning(poisoning({"peers": [peer("a", 0.9)], "events": []})) == []


def test_bytes_by_kind_are_added_up_over_peers_and_tabled(capsys):
    from trainer.chaos.report import render_traffic, traffic
    from trainer.launch.local import print_table
    from trainer.launch.summary import share, total_bytes

    def kinds(w, m, c):
        return {k: {"sent": v, "received": v // 2} for k, v in zip(KINDS, (w, m, c), strict=True)}

    peers = [
        {"name": "a", "bytes": kinds(8_000_000, 30_000, 2_000)},
        {"name": "b", "bytes": kinds(4_000_000, 10_000, 0)},
        {"name": "c", "bytes": None},  # killed before its first progress event
    ]
    total = total_bytes(peers)
    assert total == kinds(12_000_000, 40_000, 2_000)
    assert share(peers[0]["bytes"]) == 8_000_000 / 8_032_000 and share(None) is None
    assert total_bytes([{"name": "old run", "bytes_sent": 1}]) is None
    summary = {"peers": peers, "bytes": total, "compression_ratio": 1.0}
    text = "\n".join(render_traffic(traffic(summary)))
    assert "| peer | weights | membership | control |" in text
    assert "| a | 8.000 / 4.000 | 0.030 / 0.015 | 0.002 / 0.001 |" in text
    assert "| c | - | - | - |" in text and "| **all** | 12.000 / 6.000 |" in text
    assert render_traffic(traffic({"peers": peers})) == []

    for p in peers:
        p.update(status="finished", steps=1, exchanges=1, wall_seconds=1.0,
                 bytes_sent=1, bytes_received=1)  # fmt: skip
    print_table({**summary, "wall_seconds": 1.0}, Path("run"))
    out = capsys.readouterr().out
    assert "wts% memb KB" in out.splitlines()[0]
    assert "  99.6    45.0" in out.splitlines()[1]  # a: weights' share out, membership KB
    assert "sent by kind: weights 12.00 MB, membership 40.0 KB, control 2.0 KB" in out
