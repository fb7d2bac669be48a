"""Robust mixing: every received update is screened and bounded before it is mixed.

A peer mixes ``alpha * (remote - ours)`` into its weights (``gossip.averaging``). A member
that holds the cluster secret can send anything: zeros, our weights negated, scaled up,
drowned in noise. ``UpdateGuard`` (a fixed multiple of our own norm) lets all of those
through. ``Screen`` judges each delta by how far it is from what honest neighbours have
recently sent, and bounds how far any one exchange may move us:

- **Reference.** The median norm of the last ``window`` accepted deltas (all neighbours
  together). Honest deltas between peers of one swarm are differences of high-dimensional
  vectors that trained for a similar time from the same start, so their norms cluster
  tightly; a median ignores a minority of odd ones, so a poisoner that is fewer than half
  of the exchanges cannot move it.
- **Refuse.** A delta longer than ``refuse_multiple`` times the reference is refused, unless
  it is within ``drift_multiple`` times how far our own weights moved since they last took
  anything in (two peers that could not exchange for a while, in a partition say, both
  trained on and are that much farther apart); so is any update whose weights' norm is more
  than ``norm_ratio`` off ours (zeros, a scaled or noise-drowned vector), whatever the
  reference says.
- **Clip.** An accepted delta longer than ``clip_multiple`` times the reference is scaled
  down to that length before it is mixed (self-centred clipping, He, Karimireddy and Jaggi
  2022): one exchange moves us at most ``alpha * clip_multiple * reference``.
- **Warm-up.** Until ``warmup`` deltas have been accepted there is no reference. Peers
  start from identical weights (same seed), so early honest deltas are small next to the
  weights (a fifth to a third of their norm for the seed MLP at the first exchange) and
  next to how far we moved ourselves: a delta beyond ``own_fraction`` of our norm and
  beyond ``drift_multiple`` times our own movement is refused (and nothing below that is
  clipped: with no reference, a clip would be a guess, and a wrong one keeps honest peers
  apart until every delta looks far). A negated vector
  is twice our norm away; zero, scaled and noisy ones fail the norm ratio; so every poison
  above is refused from step 0.
- **Are we the outlier?** If more of the neighbours we have judged look far (their last
  delta was beyond the reference bound) than near, the odd one out is more likely us (we
  were partitioned, paused, or our reference is stale) than a majority of them. We then
  judge by the warm-up bound instead of the reference, so we can rejoin the others.
- **Quarantine.** A neighbour refused ``quarantine_after`` times in a row is quarantined:
  no exchange with it, neither started nor answered, for ``quarantine_seconds``, doubling
  with each new quarantine up to ``quarantine_max_seconds``. After release one more refusal
  quarantines it again; an accepted delta clears its record.

Pure code: no I/O, the caller passes the time and the norms. One ``Screen`` per exchanger;
it keeps a few floats per neighbour and never touches the weight vectors (the caller scales
the delta, and ``DeltaStream`` sums the norms while the payload arrives).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RobustMixing:
    # Screen and clip received updates (False: only UpdateGuard's checks, as before).
    enabled: bool = True
    # Accepted delta norms remembered; their median is the reference.
    window: int = 32
    # Accepted deltas needed before the reference is used; until then, the warm-up bound.
    warmup: int = 8
    # Refuse an update whose weights' norm is more than this factor off ours, always
    # (zero, scaled, drowned in noise). Honest peers grow from one start at one pace; early
    # BatchNorm running statistics (averaged with the weights) put two honest peers of
    # examples/bn_task.py 1.65x apart.
    norm_ratio: float = 3.0
    # Without a reference (warm-up, or we are the outlier), refuse a delta longer than this
    # fraction of our own weights' norm (a negated vector is 2.0 away) ...
    own_fraction: float = 0.75
    # ... unless it is within this multiple of how far our own weights moved since they
    # last took anything in (the start, a mix, a catch-up): two honest peers that trained
    # as long since they last met are at most about twice that apart. This allowance holds
    # with a reference too. Measured at the first exchange (period 20): 0.21 and 0.36 of our
    # norm, 1.2x our movement, for the seed MLP on the bundled data set (iid, Dirichlet
    # 0.5); 1.4x our norm but 1.9x our movement for a 4x2 linear map.
    drift_multiple: float = 3.0
    # With a reference: refuse a delta longer than this multiple of it ... (honest ones
    # measured up to 3.2x without faults, 5.4x from a CPU-starved neighbour; a negated
    # vector is 2x our norm away, tens of times the median)
    refuse_multiple: float = 6.0
    # ... and clip an accepted one to this multiple of it.
    clip_multiple: float = 2.0
    # A delta shorter than this fraction of our norm is never refused nor clipped shorter:
    # a reference near zero (peers that just averaged twice) must not refuse everything.
    floor_fraction: float = 0.01
    # Refusals in a row that quarantine a neighbour ...
    quarantine_after: int = 3
    # ... for this many seconds, doubling with each new quarantine, up to the maximum.
    quarantine_seconds: float = 10.0
    quarantine_max_seconds: float = 160.0


@dataclass
class Verdict:
    """What to do with one delta: mix it scaled by ``scale``, or refuse it (``reason``)."""

    accepted: bool
    scale: float = 1.0  # < 1: clipped
    norm: float = 0.0  # ||remote - ours||
    limit: float = math.inf  # refused beyond this norm
    reference: float | None = None  # the median in force (None: the warm-up bound)
    reason: str = ""
    quarantine: float = 0.0  # > 0: this refusal quarantined the neighbour for so many s

    @property
    def clipped(self) -> bool:
        return self.accepted and self.scale < 1.0


@dataclass
class _Standing:
    """What we remember of one neighbour."""

    refused_in_row: int = 0
    level: int = 0  # quarantines since its last accepted delta (the back-off exponent)
    until: float = 0.0  # quarantined until this time
    far: bool = False  # its last delta was beyond the reference bound
    why: str = ""


# Neighbours remembered; beyond this the one judged longest ago is forgotten.
MAX_STANDINGS = 4096


@dataclass
class Screen:
    config: RobustMixing = field(default_factory=RobustMixing)

    def __post_init__(self) -> None:
        self.norms: deque[float] = deque(maxlen=max(1, self.config.window))
        self.standings: dict[str, _Standing] = {}
        self.accepted = 0
        self.refused = 0
        self.clipped = 0
        self.quarantines = 0
        self.largest_ratio = 0.0  # largest accepted norm / reference seen

    def reset(self) -> None:
        """Forget everything (a peer whose own weights were replaced)."""
        self.__post_init__()

    # -- the reference -------------------------------------------------------------------------
    def reference(self) -> float | None:
        """Median of the recently accepted delta norms; None during warm-up."""
        if len(self.norms) < max(1, self.config.warmup):
            return None
        ordered = sorted(self.norms)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def outlier(self) -> bool:
        """More of the neighbours we judged look far than near: the odd one out is us."""
        far = sum(1 for s in self.standings.values() if s.far)
        return far > len(self.standings) - far

    # -- judging -------------------------------------------------------------------------------
    def judge(
        self,
        peer: str,
        dist_sq: float,
        snap_sq: float,
        now: float,
        record: bool = True,
        remote_sq: float | None = None,
        drift_sq: float | None = None,
    ) -> Verdict:
        """The verdict on a delta of squared norm ``dist_sq`` from ``peer``; our own weights
        have squared norm ``snap_sq``, the remote ones ``remote_sq``, and our weights moved
        ``sqrt(drift_sq)`` by our own steps since they last took anything in (None: not
        known). All finite: ``averaging.judge`` checked.

        ``record=False`` leaves an accepted norm out of the reference: a peer that has
        finished training passes that, since two finished peers soon send each other almost
        nothing, and a reference that shrank to that would refuse the next neighbour still
        training."""
        cfg = self.config
        norm, own = math.sqrt(dist_sq), math.sqrt(snap_sq)
        ref = self.reference()
        standing = self._standing(peer)
        odd = self._odd_norm(own, remote_sq)
        moved = cfg.drift_multiple * math.sqrt(max(0.0, drift_sq)) if drift_sq is not None else 0.0
        bound = max(cfg.own_fraction * own, moved) or math.inf  # 0: weights of 0, unmoved
        floor = cfg.floor_fraction * own
        far_at = bound if ref is None else max(cfg.refuse_multiple * ref, floor, moved)
        standing.far = odd is not None or norm > far_at
        used = None if ref is None or self.outlier() else ref
        if used is None:  # warm-up, or we are the outlier: no clipping below the bound
            limit = tau = bound
        else:
            limit = far_at
            tau = max(cfg.clip_multiple * used, floor)
        if odd is not None:
            reason = f"update implausible: {odd}"
            return self._refuse(peer, standing, reason, now, norm, limit, used)
        if norm > limit:
            if used:
                what = f"{norm / used:.1f}x the recent median"
            elif used is not None:
                what = "the recent median is 0"
            else:
                what = f"{norm / own:.2f}x our own norm" if own else "our weights are 0"
                if ref is not None:
                    what += "; we look like the outlier, so the warm-up bound applies"
            reason = f"update implausibly far from ours ({norm:.3g} > {limit:.3g}: {what})"
            return self._refuse(peer, standing, reason, now, norm, limit, used)
        scale = tau / norm if norm > tau > 0 else 1.0
        if record:
            self.norms.append(norm)
        self.accepted += 1
        self.clipped += scale < 1.0
        if used:
            self.largest_ratio = max(self.largest_ratio, norm / used)
        standing.refused_in_row = 0
        standing.level = 0
        return Verdict(True, scale, norm, limit, used)

    def _odd_norm(self, own: float, remote_sq: float | None) -> str | None:
        """Why the remote weights' norm is implausible next to ours (None: it is not)."""
        if remote_sq is None or own <= 0:
            return None
        ratio = math.sqrt(remote_sq) / own
        if 1 / self.config.norm_ratio <= ratio <= self.config.norm_ratio:
            return None
        return f"its weights' norm is {ratio:.3g}x ours"

    def refuse(self, peer: str, reason: str, now: float) -> Verdict:
        """Count a refusal decided elsewhere (non-finite, wrong size): it quarantines too."""
        standing = self._standing(peer)
        standing.far = True
        return self._refuse(peer, standing, reason, now, math.nan, math.nan, self.reference())

    def _refuse(
        self,
        peer: str,
        standing: _Standing,
        reason: str,
        now: float,
        norm: float,
        limit: float,
        ref: float | None,
    ) -> Verdict:
        cfg = self.config
        self.refused += 1
        standing.refused_in_row += 1
        standing.why = reason
        verdict = Verdict(False, 0.0, norm, limit, ref, reason)
        if standing.refused_in_row >= max(1, cfg.quarantine_after):
            seconds = min(cfg.quarantine_max_seconds, cfg.quarantine_seconds * 2**standing.level)
            standing.level += 1
            standing.until = now + seconds
            self.quarantines += 1
            verdict.quarantine = seconds
        return verdict

    def quarantined(self, peer: str, now: float) -> float:
        """Seconds ``peer`` stays quarantined (0: not quarantined)."""
        standing = self.standings.get(peer)
        return max(0.0, standing.until - now) if standing is not None else 0.0

    def why(self, peer: str) -> str:
        standing = self.standings.get(peer)
        return standing.why if standing is not None else ""

    def _standing(self, peer: str) -> _Standing:
        standing = self.standings.pop(peer, None) or _Standing()
        self.standings[peer] = standing  # most recently judged last
        if len(self.standings) > MAX_STANDINGS:
            del self.standings[next(iter(self.standings))]
        return standing

    def stats(self) -> dict[str, Any]:
        ref = self.reference()
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "clipped": self.clipped,
            "quarantines": self.quarantines,
            "reference": None if ref is None else round(ref, 6),
            "largest_ratio": round(self.largest_ratio, 3),
        }
