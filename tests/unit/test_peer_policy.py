"""The gossip CPU budget and the choice of partners."""

import pytest

from gossip.policy import CpuBudget


def test_within_budget_never_waits():
    b = CpuBudget(0.1, burst=5.0)
    t, spent = 0.0, 0.0
    for _ in range(1000):  # 1 ms of gossip CPU every 20 ms of wall time: 5%
        t += 0.02
        spent += 0.001
        assert b.wait(spent, t) == 0.0


def test_over_budget_waits_until_back_within_it():
    b = CpuBudget(0.1, burst=1.0)  # 0.1 CPU s of credit at most
    assert b.wait(0.05, 0.0) == 0.0  # starts with full credit
    wait = b.wait(0.35, 0.0)  # 0.3 s more at once: 0.25 s in debt
    assert wait == pytest.approx(2.5)  # 0.25 CPU s / 0.1 per second
    assert b.wait(0.35, 2.5) == pytest.approx(0.0, abs=1e-12)
    assert b.wait(0.35, 3.0) == 0.0


def test_long_rests_save_up_a_bounded_credit():
    b = CpuBudget(0.1, burst=2.0)
    b.wait(0.0, 0.0)
    # An hour idle earns no more than 2 s worth (0.2 CPU s), so a burst after it is short.
    assert b.wait(0.2, 3600.0) == 0.0
    assert b.wait(0.3, 3600.0) == pytest.approx(1.0)


def test_zero_share_disables_it():
    assert CpuBudget(0.0).wait(100.0, 0.0) == 0.0


def test_partners_cycle_before_any_repeats():
    import random

    from gossip.policy import partner_order

    rng, partnered = random.Random(1), set()
    addrs = [f"10.0.0.{i}:1" for i in range(5)]
    picks = []
    for _ in range(15):  # three full cycles
        first = partner_order(addrs, partnered, rng)[0]
        partnered.add(first)  # as gossip_round does after a completed exchange
        picks.append(first)
    for cycle in range(3):
        assert sorted(picks[5 * cycle : 5 * cycle + 5]) == sorted(addrs)
    # A neighbour that left is simply not offered; one that joins comes first.
    partnered.clear()
    partnered.add(addrs[0])
    order = partner_order([*addrs[:3], "10.0.0.9:1"], partnered, rng)
    assert order[-1] == addrs[0] and set(order) == {*addrs[:3], "10.0.0.9:1"}


def test_period_clock_offers_once_per_period_without_exchanges():
    import random

    from gossip.policy import PeriodClock

    clock = PeriodClock(20, random.Random(0))
    offers = [s for s in range(1, 101) if clock.step(0)]
    assert offers == [20, 40, 60, 80, 100]


def test_period_clock_counts_an_answered_exchange_and_spreads_the_restart():
    import random

    from gossip.policy import PeriodClock

    restarts = set()
    for seed in range(40):
        clock = PeriodClock(20, random.Random(seed))
        for _ in range(15):
            assert not clock.step(0)
        # A neighbour's exchange completes at step 16: the count restarts, so no offer at 20.
        fired = [s for s in range(16, 60) if clock.step(1)]
        assert fired and fired[0] - 16 in range(14, 25)  # about 20 steps, give or take 5
        restarts.add(fired[0])
    assert len(restarts) > 5  # partners restarting together do not fire together


def test_lingering_keeps_pace_with_the_models_period() -> None:
    from gossip.policy import ScheduleConfig, linger_interval

    s = ScheduleConfig()  # period 20 steps, interval 50 ms
    # The seed MLP (0.6 ms a step): the configured interval stands.
    assert linger_interval(s, 0.0006) == s.linger_interval
    # A transformer at 0.27 s a step: a period is 5.4 s; offer twice a period.
    assert linger_interval(s, 0.27) == pytest.approx(2.7)
