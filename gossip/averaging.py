"""Averaging math, free of I/O: schema hashes, update checks, the pairwise mix.

Weights travel as one flat float32 vector. A pairwise push-pull average between peers
i and j with snapshots w_i, w_j sets both to (w_i + w_j) / 2. Each side applies it as a
delta against the snapshot it sent, so local steps taken while the exchange was in flight
are kept (AD-PSGD, Lian et al. 2018):

    current <- current + alpha * (remote - snapshot),   alpha = 1/2

``DeltaStream`` computes that delta in place in the receive buffer while the payload is
still arriving, so the mix after the last byte is one add.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from p2p.framing import show, text

SchemaEntry = tuple[str, tuple[int, ...], str]


def schema_hash(entries: Iterable[SchemaEntry]) -> str:
    """A short stable hash of (name, shape, dtype) for every tensor, in order."""
    canon = [[name, list(shape), dtype] for name, shape, dtype in entries]
    return hashlib.sha256(msgpack.packb(canon)).hexdigest()[:16]


# A pull request carries its model's layout (name, shape, dtype per tensor), so a refusal
# can name the first tensor that differs; larger models send only the hash.
MAX_LAYOUT = 4096


def layout_diff(ours: list, theirs: Any) -> str:
    """The first difference between two layouts ([name, shape, dtype] lists), in words.
    ``theirs`` comes from the wire: anything malformed is said so, never raised."""
    if not isinstance(theirs, list):
        return "their model's layout is not known"
    for i, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if not (isinstance(other, (list, tuple)) and len(other) == 3):
            return f"tensor {i} of theirs is malformed"
        if not isinstance(other[1], (list, tuple)):
            return f"tensor {i} of theirs has no shape"
        if list(mine) != [other[0], list(other[1]), other[2]]:
            return (
                f"tensor {i}: ours is {mine[0]} {list(mine[1])} {mine[2]}, "
                f"yours is {text(other[0])} {show(list(other[1]))} {text(other[2])}"
            )
    if len(ours) != len(theirs):
        return f"we average {len(ours)} tensors, you {len(theirs)}"
    return "the layouts agree but the hashes differ"


class UpdateRejected(ValueError):
    """A received weight vector must not be applied."""


@dataclass(frozen=True)
class UpdateGuard:
    # Reject a remote vector whose distance from ours exceeds this multiple of our own norm
    # (plus an absolute floor for near-zero models). Honest peers mid-training sit well
    # inside this; a diverged or hostile one is refused instead of poisoning the average.
    max_relative_distance: float = 10.0
    absolute_floor: float = 1.0


def judge(dist_sq: float, snap_sq: float, guard: UpdateGuard = UpdateGuard()) -> None:
    """Raise ``UpdateRejected`` unless a delta of squared norm ``dist_sq`` may be applied.

    NaN or infinity anywhere in the remote vector makes ``dist_sq`` non-finite (our
    snapshot is finite, or ``snap_sq`` says it is not), and a distance beyond ``guard``
    times our own norm means an implausible jump.
    """
    if not math.isfinite(snap_sq):
        raise UpdateRejected("our own weights are not finite; not exchanging")
    if not math.isfinite(dist_sq):
        raise UpdateRejected("weight vector holds NaN or infinity")
    dist = math.sqrt(dist_sq)
    limit = guard.max_relative_distance * math.sqrt(snap_sq) + guard.absolute_floor
    if dist > limit:
        raise UpdateRejected(f"weight vector implausibly far from ours ({dist:.3g} > {limit:.3g})")


def _match(remote: np.ndarray, snapshot: np.ndarray) -> None:
    if remote.shape != snapshot.shape or remote.dtype != snapshot.dtype:
        raise UpdateRejected(
            f"weight vector {remote.dtype}{list(remote.shape)} does not match "
            f"ours {snapshot.dtype}{list(snapshot.shape)}"
        )


def _sq(v: np.ndarray) -> float:
    return float(np.dot(v, v))  # BLAS; overflow gives inf, which judge() refuses


class DeltaStream:
    """``remote - snapshot``, scaled by ``alpha``, computed in place while ``remote`` arrives.

    The transport reports how much of a payload buffer has been filled (``feed``); each
    new stretch of at least ``chunk`` bytes is turned into ``alpha * (remote - snapshot)``
    right away, while it is still in cache, and the squared norms of the delta, the snapshot
    and the remote vector are summed on the way (with an ``anchor``, also the anchor's and
    its dot product with the snapshot: ``moved_sq`` is how far we moved since the anchor).
    ``finish`` does the rest and judges the result, so after the last byte only the tail
    and the final add remain. Without progress reports, ``finish`` does it all in one go.
    The receive buffer then holds the delta: the mix is ``current += buffer``.
    """

    def __init__(
        self,
        snapshot: np.ndarray,
        alpha: float = 0.5,
        guard: UpdateGuard = UpdateGuard(),
        chunk: int = 512 << 10,
        anchor: np.ndarray | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.alpha = np.float32(alpha)
        self.guard = guard
        self.chunk = max(1, chunk // snapshot.itemsize)
        self.done = 0  # values of the buffer already turned into delta
        self.valid = snapshot.size  # values of the snapshot already taken (see Exchanger)
        self.dist_sq = 0.0
        self.snap_sq = 0.0
        self.remote_sq = 0.0
        self.anchor = anchor
        self.cross = 0.0  # snapshot . anchor
        self.anchor_sq = 0.0

    def feed(self, buffer: memoryview, filled: int) -> None:
        """``buffer``'s first ``filled`` bytes have arrived (the rest is still coming)."""
        if buffer.nbytes != self.snapshot.nbytes:
            return  # not a weight payload of ours; finish() refuses it
        upto = min(filled // self.snapshot.itemsize, self.valid)
        if upto - self.done >= self.chunk:
            self._advance(np.frombuffer(buffer, dtype=self.snapshot.dtype), upto)

    def _advance(self, remote: np.ndarray, upto: int) -> None:
        r, s = remote[self.done : upto], self.snapshot[self.done : upto]
        with np.errstate(over="ignore", invalid="ignore"):  # garbage is judged, not warned
            self.remote_sq += _sq(r)
            if self.anchor is not None:
                a = self.anchor[self.done : upto]
                self.cross += float(np.dot(s, a))
                self.anchor_sq += _sq(a)
            np.subtract(r, s, out=r)
            self.dist_sq += _sq(r)
            self.snap_sq += _sq(s)
            if self.alpha != 1:
                r *= self.alpha
        self.done = upto

    @property
    def moved_sq(self) -> float | None:
        """``||snapshot - anchor||^2`` (None without an anchor), once the stream is done."""
        if self.anchor is None:
            return None
        return max(0.0, self.snap_sq - 2 * self.cross + self.anchor_sq)

    def finish(self, remote: np.ndarray) -> np.ndarray:
        """Complete the delta in ``remote`` (the whole received vector) and judge it."""
        _match(remote, self.snapshot)
        if self.valid != self.snapshot.size:
            raise RuntimeError("the snapshot was not complete")  # a bug, not a bad peer
        if self.done < remote.size:
            self._advance(remote, remote.size)
        judge(self.dist_sq, self.snap_sq, self.guard)
        return remote


def check_update(remote: np.ndarray, local: np.ndarray, guard: UpdateGuard = UpdateGuard()) -> None:
    """Raise ``UpdateRejected`` unless ``remote`` is finite, the right size, and plausible."""
    DeltaStream(local, 1.0, guard).finish(remote.copy())


def mix(current: np.ndarray, snapshot: np.ndarray, remote: np.ndarray, alpha: float = 0.5) -> None:
    """In place: ``current += alpha * (remote - snapshot)``."""
    delta = np.subtract(remote, snapshot)
    delta *= alpha
    current += delta


def weighted_average(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Sample-weighted average (the final consensus model)."""
    if not vectors or len(vectors) != len(weights):
        raise ValueError("need one weight per vector, and at least one vector")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = np.zeros_like(vectors[0], dtype=np.float64)
    for vec, w in zip(vectors, weights, strict=True):
        out += (w / total) * vec
    return out.astype(vectors[0].dtype)
