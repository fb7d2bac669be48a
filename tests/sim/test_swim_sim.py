"""Tier 2: 100+ SWIM peers in the discrete-event simulator, fixed seeds, no sleeps.

Times below are simulated seconds; the bounds are generous multiples of what the protocol
needs, so that they assert behaviour (it converges, it detects) rather than speed.
"""

from __future__ import annotations

import dataclasses

from p2p.simulation import NetConfig, Simulation
from p2p.swim import State, SwimConfig

LAN = SwimConfig.lan()
LOSSY = NetConfig(drop=0.05)


def assert_no_false_deaths(sim: Simulation) -> None:
    assert sim.false_deaths == [], sim.false_deaths[:3]


def deaths_of(sim: Simulation, subject: str) -> list[dict]:
    return [e for e in sim.events if e["kind"] == "declared_dead" and e["subject"] == subject]


def test_peers_find_each_other_through_one_address() -> None:
    sim = Simulation(LAN, seed=1, net=LOSSY)
    first = sim.add()
    for _ in range(119):
        sim.add(seeds=[first])
        sim.run_for(0.02)
    assert sim.run_until(sim.converged, timeout=30.0)
    # A lost request or reply only delays joined(): the request is repeated until answered.
    assert sim.run_until(lambda: all(sim.nodes[n].joined() for n in sim.up() if n != first), 5)
    assert_no_false_deaths(sim)


def test_join_takes_the_first_seed_that_answers() -> None:
    sim = Simulation(LAN, seed=2)
    names = sim.add_converged(10)
    sim.kill(names[1])
    late = sim.add(seeds=[names[1], names[2]])  # the first seed is down
    sim.run_for(2.0)
    assert sim.nodes[late].joined()
    assert sim.state(names[3], late) == State.ALIVE


def test_killed_peers_are_declared_dead_by_everyone() -> None:
    sim = Simulation(LAN, seed=3, net=LOSSY)
    names = sim.add_converged(150)
    sim.run_for(5.0)
    victims = names[10:13]
    for v in victims:
        sim.kill(v)
    start = sim.now
    for v in victims:
        assert sim.run_until(lambda v=v: sim.agree(v, State.DEAD), timeout=40.0)
    # Every up peer holds exactly the survivors.
    assert sim.converged()
    assert sim.now - start < 40.0
    sim.run_for(60.0)
    assert_no_false_deaths(sim)
    assert sum(sim.nodes[n].rejected.total() for n in sim.up()) == 0


def test_short_partition_causes_no_deaths() -> None:
    sim = Simulation(LAN, seed=4, net=LOSSY)
    names = sim.add_converged(120)
    sim.run_for(5.0)
    sim.partition(names[:50], names[50:])
    sim.run_for(2.0)  # well under the suspicion timeout
    sim.heal()
    sim.run_for(60.0)
    assert not [e for e in sim.events if e["kind"] == "declared_dead"]
    assert sim.converged()


def test_long_partition_splits_then_push_pull_heals_it() -> None:
    sim = Simulation(LAN, seed=5, net=LOSSY)
    names = sim.add_converged(100)
    left, right = names[:50], names[50:]
    sim.partition(left, right)
    sim.run_for(120.0)
    assert sim.converged(left) and sim.converged(right)
    assert all(sim.state(a, b) == State.DEAD for a in left[:5] for b in right)
    sim.heal()
    assert sim.run_until(sim.converged, timeout=90.0, step=1.0)
    # The dead came back through refutation: a higher incarnation, not a reset.
    assert all(sim.nodes[b].incarnation >= 1 for b in right)


def test_pauses_short_and_long() -> None:
    sim = Simulation(LAN, seed=6, net=LOSSY)
    names = sim.add_converged(100)
    sim.run_for(5.0)
    sim.pause(names[7])
    sim.run_for(1.0)
    sim.resume(names[7])
    sim.run_for(30.0)
    assert not deaths_of(sim, names[7])

    sim.pause(names[8])
    assert sim.run_until(lambda: sim.agree(names[8], State.DEAD), timeout=60.0)
    sim.resume(names[8])
    resumed = sim.now
    assert sim.run_until(sim.converged, timeout=30.0)
    assert sim.nodes[names[8]].incarnation >= 1
    back = {
        e["at"]: e["previous"]
        for e in sim.events
        if e["kind"] == "alive" and e["subject"] == names[8] and e["t"] >= resumed
    }
    assert back == {n: "dead" for n in sim.up() if n != names[8]}
    assert_no_false_deaths(sim)


def test_graceful_leave_is_seen_as_left() -> None:
    sim = Simulation(LAN, seed=7, net=LOSSY)
    names = sim.add_converged(100)
    sim.run_for(3.0)
    sim.leave(names[4])
    sim.leave(names[5])
    for gone in names[4:6]:
        assert sim.run_until(lambda g=gone: sim.agree(g, State.LEFT), timeout=10.0)
    sim.run_for(30.0)
    assert sim.status[names[4]] == "left"  # it stopped once its news was out
    assert not deaths_of(sim, names[4]) and not deaths_of(sim, names[5])
    assert sim.converged()


def test_restarted_peer_rejoins_under_a_higher_incarnation() -> None:
    sim = Simulation(LAN, seed=8, net=LOSSY)
    names = sim.add_converged(100)
    sim.run_for(3.0)
    sim.kill(names[9])
    assert sim.run_until(lambda: sim.agree(names[9], State.DEAD), timeout=60.0)
    sim.restart(names[9], seeds=[names[0]])
    assert sim.run_until(sim.converged, timeout=20.0)
    assert all(
        m.incarnation >= 1
        for n in sim.up()
        if n != names[9]
        for m in sim.nodes[n].members()
        if m.name == names[9]
    )
    assert_no_false_deaths(sim)


def test_faults_together_kill_only_the_killed() -> None:
    sim = Simulation(LAN, seed=9, net=NetConfig(drop=0.1, jitter=0.02))
    names = sim.add_converged(160)
    sim.run_for(2.0)
    victims = names[:4]
    for i, v in enumerate(victims):
        sim.kill(v)
        sim.pause(names[20 + i])
        sim.run_for(0.5)
        sim.resume(names[20 + i])
        sim.run_for(5.0)
    assert sim.run_until(lambda: all(sim.agree(v, State.DEAD) for v in victims), timeout=60.0)
    sim.run_for(30.0)
    assert {e["subject"] for e in sim.events if e["kind"] == "declared_dead"} == set(victims)
    assert sim.converged()
    assert_no_false_deaths(sim)


def test_local_profile_finds_a_killed_peer_among_five_quickly() -> None:
    """local(): 5 peers on a loaded machine (late messages, short stalls); a SIGKILLed
    peer is dead to all within 5 simulated seconds, and nobody else ever dies."""
    net = NetConfig(delay=0.001, jitter=0.03)
    worst = 0.0
    for seed in range(12):
        sim = Simulation(SwimConfig.local(), seed=seed, net=net)
        names = sim.add_converged(5)
        for k in range(40):  # 20 s of event-loop stalls of 50-150 ms here and there
            stalled = names[k % 5]
            sim.pause(stalled)
            sim.run_for(0.05 + 0.1 * ((k * 7 + seed) % 3) / 2)
            sim.resume(stalled)
            sim.run_for(0.4)
        victim = names[seed % 5]
        sim.kill(victim)
        start = sim.now
        assert sim.run_until(lambda s=sim, v=victim: s.agree(v, State.DEAD), 10.0, step=0.05)
        worst = max(worst, sim.now - start)
        sim.run_for(120.0)
        assert_no_false_deaths(sim)
        assert {e["subject"] for e in sim.events if e["kind"] == "declared_dead"} == {victim}
    assert worst <= 5.0, worst


def test_same_seed_same_history() -> None:
    def history(seed: int) -> list[tuple]:
        sim = Simulation(dataclasses.replace(LAN, push_pull_interval=5.0), seed, LOSSY)
        names = sim.add_converged(40)
        sim.add(seeds=[names[0]])
        sim.kill(names[3])
        sim.run_for(40.0)
        return [(e["at"], e["kind"], e["subject"], round(e["t"], 9)) for e in sim.events]

    one = history(11)
    assert one == history(11)
    assert one != history(12)
