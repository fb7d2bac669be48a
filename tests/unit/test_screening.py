"""Robust mixing's statistics (gossip.screening): warm-up, refusal, clipping, quarantine."""

import math

import numpy as np
import pytest

from gossip.screening import RobustMixing, Screen

OWN = 10.0  # our own weights' norm in these tests


def judge(screen, peer, norm, now=0.0, own=OWN):
    return screen.judge(peer, norm * norm, own * own, now)


def judge_vectors(screen, peer, ours, theirs, anchor=None, now=0.0):
    """The verdict on ``theirs`` with every norm the exchanger measures (DeltaStream)."""
    d = theirs - ours
    drift = None if anchor is None else float((ours - anchor) @ (ours - anchor))
    return screen.judge(
        peer, float(d @ d), float(ours @ ours), now, remote_sq=float(theirs @ theirs),
        drift_sq=drift,
    )  # fmt: skip


def warmed(reference=1.0, peers="abc", n=None):
    """A screen that has accepted ``window`` deltas of norm ``reference`` from ``peers``."""
    screen = Screen()
    for i in range(n or screen.config.window):
        assert judge(screen, peers[i % len(peers)], reference).accepted
    return screen


def poisons(rng, size=10_000):
    """Our weights w, and what each hostile mode sends instead of a neighbour's weights."""
    w = rng.normal(scale=0.02, size=size)
    return w, {
        "zero": np.zeros_like(w),
        "negate": -w,
        "scale": 10 * w,
        "noise": w + rng.normal(scale=10 * np.sqrt(np.mean(w**2)), size=size),
    }


@pytest.mark.parametrize("mode", ["zero", "negate", "scale", "noise"])
def test_during_warm_up_every_poison_is_refused_and_early_honest_deltas_pass(mode):
    rng = np.random.default_rng(1)
    w0, sent = poisons(rng)
    rms = np.sqrt(np.mean(w0**2))
    w = w0 + rng.normal(scale=0.15 * rms, size=w0.size)  # we trained a little from w0
    screen = Screen()
    assert screen.reference() is None  # nothing accepted yet: no statistic
    verdict = judge_vectors(screen, "evil", w, sent[mode], anchor=w0)
    assert not verdict.accepted and "implausib" in verdict.reason
    # A neighbour that trained as long from the same start.
    honest = w0 + rng.normal(scale=0.15 * rms, size=w0.size)
    verdict = judge_vectors(screen, "good", w, honest, anchor=w0)
    assert verdict.accepted and verdict.scale == 1.0


def test_a_model_that_moves_far_in_a_few_steps_is_judged_by_its_own_movement():
    # Like the 4x2 linear maps fitted to opposite targets in tests/real/test_own_loop.py
    # (1.4x our norm apart after 5 steps): here the neighbour is our norm away, beyond the
    # own-norm bound, but only twice our own movement, as far as one that trained as long
    # the other way can be.
    screen = Screen()
    w0 = np.array([0.3, -0.4, 0.2, 0.1, -0.3, 0.35, 0.25, -0.2, 0.1, 0.05])
    step = np.linspace(-0.25, 0.2, 10)
    ours, theirs = w0 + step, w0 - step  # moved the opposite ways
    verdict = judge_vectors(screen, "b", ours, theirs, anchor=w0)
    assert verdict.accepted, verdict.reason
    assert verdict.scale == 1.0  # nor clipped: the two must be able to meet
    assert not judge_vectors(screen, "b", ours, theirs).accepted  # without the anchor


def test_the_reference_is_the_median_of_accepted_deltas_once_warm():
    screen = Screen(RobustMixing(warmup=3, window=5))
    for norm in (1.0, 9.0):
        judge(screen, "a", norm, own=100.0)
    assert screen.reference() is None
    judge(screen, "a", 2.0, own=100.0)
    assert screen.reference() == 2.0  # median of 1, 9, 2
    for norm in (3.0, 3.0, 3.0):
        judge(screen, "a", norm, own=100.0)
    assert list(screen.norms) == [9.0, 2.0, 3.0, 3.0, 3.0] and screen.reference() == 3.0


@pytest.mark.parametrize("norm", [6.5, 10.0, 20.0])
def test_after_warm_up_a_delta_far_beyond_the_median_is_refused(norm):
    screen = warmed(reference=1.0)
    verdict = judge(screen, "d", norm)
    assert not verdict.accepted
    assert verdict.limit == pytest.approx(6.0) and verdict.reference == pytest.approx(1.0)
    assert "x the recent median" in verdict.reason


@pytest.mark.parametrize("remote", [0.0, 0.3 * OWN, 3.5 * OWN, 10 * OWN])
def test_weights_of_another_norm_are_refused_whatever_the_median_says(remote):
    # Accepted deltas of our own norm (a poisoned statistic): the norm ratio still refuses
    # zeros, shrunk, scaled and noise-drowned weights.
    screen = Screen(RobustMixing(own_fraction=2.0))
    for _ in range(32):
        assert screen.judge("a", OWN**2, OWN**2, 0.0, remote_sq=OWN**2).accepted
    verdict = screen.judge("d", OWN**2, OWN**2, 0.0, remote_sq=remote**2)
    assert not verdict.accepted and "norm is" in verdict.reason
    assert screen.judge("d", OWN**2, OWN**2, 0.0, remote_sq=(1.7 * OWN) ** 2).accepted


def test_neighbours_we_could_not_reach_for_a_while_are_farther_and_still_honest():
    # A partition or a string of failed exchanges: we trained on alone, moved 3.0, and so
    # did they. Their delta is 8.5x the median, yet within 3x our own movement: accepted,
    # and clipped as any other, so it moves us no more than an ordinary exchange.
    screen = warmed(reference=1.0)
    verdict = screen.judge("b", 8.5**2, OWN**2, 0.0, drift_sq=3.0**2)
    assert verdict.accepted and verdict.scale * 8.5 == pytest.approx(2.0)
    assert not screen.judge("b", 8.5**2, OWN**2, 0.0, drift_sq=1.0**2).accepted
    assert not screen.judge("c", 9.5**2, OWN**2, 0.0, drift_sq=3.0**2).accepted


def test_clipping_bounds_how_far_one_update_moves_us():
    screen = warmed(reference=1.0)
    assert judge(screen, "a", 1.5).scale == 1.0  # within clip_multiple: as it is
    verdict = judge(screen, "a", 3.0)
    assert verdict.accepted and verdict.clipped
    assert verdict.scale * 3.0 == pytest.approx(2.0)  # scaled down to 2 x the median
    assert screen.clipped == 1
    # However long an accepted delta, what is mixed is at most clip_multiple x reference.
    for norm in np.linspace(0.1, 5.99, 50):
        v = judge(screen, "b", float(norm))
        assert v.accepted and v.scale * norm <= 2.0 * screen.reference() + 1e-9


def test_honest_deltas_that_vary_as_non_iid_ones_do_raise_no_alarm():
    # Log-normal spread (sigma 0.25: a 90% range of 0.66x-1.5x around the median), a slow
    # trend down as training converges, and now and then a pair that just averaged (tiny).
    rng = np.random.default_rng(7)
    screen = Screen()
    for i in range(5000):
        norm = 0.5 * math.exp(-i / 4000) * rng.lognormal(0.0, 0.25)
        if i % 37 == 0:
            norm *= 0.01
        assert judge(screen, f"p{i % 6}", norm, now=i * 0.1).accepted, (i, norm)
    assert screen.refused == 0 and screen.quarantines == 0
    assert screen.clipped < 0.03 * screen.accepted and screen.largest_ratio < 4.0


def test_deltas_judged_after_training_leave_the_reference_alone():
    screen = warmed(reference=1.0)
    for _ in range(100):  # lingering: another finished peer, almost equal to us by now
        assert screen.judge("b", 1e-6, OWN**2, 0.0, record=False).accepted
    assert screen.reference() == 1.0
    assert judge(screen, "c", 1.5).accepted  # a peer still training is not refused


def test_a_reference_near_zero_does_not_refuse_everything():
    screen = warmed(reference=0.0)  # peers that just averaged send identical weights
    assert screen.reference() == 0.0
    verdict = judge(screen, "a", 0.009 * OWN)  # within floor_fraction of our norm
    assert verdict.accepted and verdict.scale == 1.0
    assert not judge(screen, "a", 0.02 * OWN).accepted


def test_repeated_refusals_quarantine_with_a_doubling_back_off_and_release():
    screen = warmed(reference=1.0)
    assert judge(screen, "evil", 50.0, now=100.0).quarantine == 0
    assert judge(screen, "evil", 50.0, now=101.0).quarantine == 0
    assert screen.quarantined("evil", 101.0) == 0
    third = judge(screen, "evil", 50.0, now=102.0)
    assert third.quarantine == 10.0 and screen.quarantines == 1
    assert screen.quarantined("evil", 105.0) == pytest.approx(7.0)
    assert screen.quarantined("good", 105.0) == 0 and screen.quarantined("a", 105.0) == 0
    assert "implausibly far" in screen.why("evil")
    assert screen.quarantined("evil", 112.0) == 0  # released
    # On parole: the next refusal quarantines again, twice as long, and so on to the cap.
    assert judge(screen, "evil", 50.0, now=113.0).quarantine == 20.0
    seconds = [judge(screen, "evil", 50.0, now=200.0 + 200 * k).quarantine for k in range(6)]
    assert seconds == [40.0, 80.0, 160.0, 160.0, 160.0, 160.0]
    # An accepted delta clears the record: three refusals in a row again, from 10 s.
    assert judge(screen, "evil", 1.0, now=2000.0).accepted
    assert [judge(screen, "evil", 50.0, now=2001.0).quarantine for _ in range(3)] == [0, 0, 10.0]


def test_refusals_between_acceptances_do_not_quarantine():
    screen = warmed(reference=1.0)
    for k in range(10):
        assert not judge(screen, "odd", 50.0, now=k).accepted
        assert judge(screen, "odd", 1.0, now=k).accepted
    assert screen.quarantines == 0 and screen.refused == 10


def test_refusals_decided_elsewhere_count_towards_quarantine():
    screen = Screen()
    verdicts = [screen.refuse("nan", "weight vector holds NaN or infinity", 5.0) for _ in range(3)]
    assert [v.accepted for v in verdicts] == [False] * 3
    assert verdicts[-1].quarantine == 10.0 and screen.quarantined("nan", 6.0) == 9.0


def test_the_odd_one_out_judges_by_the_warm_up_bound_so_it_can_rejoin():
    # Our reference is from before a partition; the others trained on without us.
    screen = warmed(reference=1.0, peers="a")
    assert not judge(screen, "b", 7.0).accepted  # b far, a near: b looks like the odd one
    verdict = judge(screen, "c", 7.0)  # c far too: two of three far, so it is us
    assert verdict.accepted and verdict.reference is None
    assert verdict.scale == 1.0  # the warm-up bound clips nothing below it
    assert not judge(screen, "c", 0.8 * OWN).accepted  # a poison is still refused
    # Once the others are near again, the reference is back in force.
    judge(screen, "b", 1.0)
    judge(screen, "c", 1.0)
    assert not screen.outlier() and not judge(screen, "a", 7.0).accepted


def test_one_poisoner_among_honest_neighbours_does_not_make_us_the_outlier():
    screen = warmed(reference=1.0, peers="abc")
    for k in range(20):
        judge(screen, "evil", OWN, now=k)
    assert screen.outlier() is False
    assert all(not judge(screen, "evil", 7.0, now=100 + k).accepted for k in range(5))


def test_reset_and_stats():
    screen = warmed(reference=1.0)
    judge(screen, "a", 3.0)
    judge(screen, "e", 40.0)
    stats = screen.stats()
    assert stats["accepted"] == 33 and stats["refused"] == 1 and stats["clipped"] == 1
    assert stats["reference"] == 1.0 and stats["largest_ratio"] == 3.0
    screen.reset()
    assert screen.reference() is None and screen.stats()["accepted"] == 0
    assert screen.quarantined("e", 0.0) == 0
