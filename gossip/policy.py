"""When and with whom to exchange: the scheduling policy of a gossiping peer.

Pure code with no I/O: the period clock (offer an exchange every ``period_steps`` local
steps), the partner order (every live neighbour once per cycle), the CPU budget for gossip
while training, and the pace of lingering after training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Longest pause the gossip CPU budget may impose before one exchange.
MAX_BUDGET_WAIT = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    # Start an exchange after this many local steps. Lower mixes faster but spends more CPU
    # on copies and network; 20 steps of the seed MLP are ~20 ms of compute.
    period_steps: int = 20
    # While training, gossip may use at most this much CPU per second of wall time (0.1: a
    # tenth of one core), counting the exchanges a peer answers as well as those it starts.
    # Over it, the next exchange waits until the peer is back within it (saved-up credit
    # is capped at a few seconds' worth). Bounds the overhead for big models and busy
    # peers; 0 disables it.
    time_budget: float = 0.1
    # After training, a lingering peer offers an exchange every this many seconds (or every
    # half period, if that is longer; see ``linger_interval``). It lingers while some live
    # member still trains, up to the peer's linger_seconds.
    linger_interval: float = 0.05
    # Neighbours tried per round before giving up until the next period.
    max_attempts: int = 3
    # While training, a round that found every neighbour it tried (or us) busy is tried
    # again, after about half an exchange's time, up to this many times, until an exchange
    # of ours or a neighbour's has begun or the next period starts. On a slow link an
    # exchange outlasts the period: without this, each busy round skipped its period and
    # the link stood idle between exchanges. 0: a busy round waits for the next period.
    busy_retries: int = 16


class CpuBudget:
    """Gossip may use ``share`` CPU seconds per wall second: a bucket of credit.

    Credit accrues at ``share`` per second, at most ``burst`` seconds' worth, and every CPU
    second gossip spends draws it down. ``wait`` says how long until the credit is positive
    again (0 if it is now).
    """

    def __init__(self, share: float, burst: float = 5.0) -> None:
        self.share = share
        self.cap = share * burst
        self.credit = self.cap
        self._spent = 0.0
        self._t: float | None = None

    def wait(self, spent: float, now: float) -> float:
        if self.share <= 0:
            return 0.0
        if self._t is not None:
            self.credit = min(self.cap, self.credit + self.share * (now - self._t))
        self.credit -= spent - self._spent
        self._spent, self._t = spent, now
        return 0.0 if self.credit >= 0 else -self.credit / self.share


class PeriodClock:
    """When a training peer should offer its next exchange: after ``period`` steps without one.

    An exchange a neighbour started counts as this period's, so exchanges come evenly spaced,
    about one per period per peer, instead of two at random offsets (the second of which
    mixes little). After each exchange the count restarts at a random offset within a
    quarter period, so two partners do not both reach the period on the same step and
    offer to each other at once (each would decline the other: busy).
    """

    def __init__(self, period: int, rng: random.Random) -> None:
        self.period = max(1, period)
        self.spread = max(1, self.period // 4)
        self.rng = rng  # used from the training thread only
        self.since = 0
        self._seen = 0

    def step(self, exchanges: int) -> bool:
        """One training step done, ``exchanges`` completed so far: True to offer one now."""
        if exchanges != self._seen:
            self._seen = exchanges
            self.since = self.rng.randint(-self.spread, self.spread)
        self.since += 1
        if self.since >= self.period:
            self.since = 0
            return True
        return False


def partner_order(addrs: list[str], partnered: set[str], rng: random.Random) -> list[str]:
    """``addrs`` in the order to try them: those not in ``partnered`` first, shuffled.

    Partners are drawn without replacement: every live neighbour is picked once before any
    is picked twice, then the cycle starts over (``partnered`` is cleared). Averaging twice
    in a row with the same partner mixes almost nothing new; a cycle spreads each average.
    """
    fresh = [a for a in addrs if a not in partnered]
    if not fresh:
        partnered.clear()
        fresh = list(addrs)
    stale = [a for a in addrs if a in partnered]
    rng.shuffle(fresh)
    rng.shuffle(stale)
    return fresh + stale


def linger_interval(s: ScheduleConfig, step_seconds: float) -> float:
    """How often a lingering peer offers an exchange, for a model whose steps take
    ``step_seconds``.

    Training peers offer about once a period (``period_steps`` of their steps). For a model
    whose period lasts seconds, offers every ``linger_interval`` would average a training
    peer many times a period with frozen weights, holding it back; so at most two offers a
    period (the seed MLP: every 50 ms, as set).
    """
    period = max(0.0, s.period_steps * step_seconds)
    return max(s.linger_interval, period / 2.0)
