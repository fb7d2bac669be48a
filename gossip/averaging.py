"""Averaging math, free of I/O: schema hashes, update checks, the pairwise mix.

Weights travel as one flat float32 vector. A pairwise push-pull average between peers
i and j with snapshots w_i, w_j sets both to (w_i + w_j) / 2. Each side applies it as a
delta against the snapshot it sent, so local steps taken while the exchange was in flight
are kept (AD-PSGD, Lian et al. 2018):

    current <- current + alpha * (remote - snapshot),   alpha = 1/2
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
import numpy as np

SchemaEntry = tuple[str, tuple[int, ...], str]


def schema_hash(entries: Iterable[SchemaEntry]) -> str:
    """A short stable hash of (name, shape, dtype) for every tensor, in order."""
    canon = [[name, list(shape), dtype] for name, shape, dtype in entries]
    return hashlib.sha256(msgpack.packb(canon)).hexdigest()[:16]


class UpdateRejected(ValueError):
    """A received weight vector must not be applied."""


@dataclass(frozen=True)
class UpdateGuard:
    # Reject a remote vector whose distance from ours exceeds this multiple of our own norm
    # (plus an absolute floor for near-zero models). Honest peers mid-training sit well
    # inside this; a diverged or hostile one is refused instead of poisoning the average.
    max_relative_distance: float = 10.0
    absolute_floor: float = 1.0


def checked_delta(
    remote: np.ndarray,
    snapshot: np.ndarray,
    snapshot_norm: float,
    out: np.ndarray,
    guard: UpdateGuard = UpdateGuard(),
) -> np.ndarray:
    """``out = remote - snapshot``, or ``UpdateRejected`` if it must not be applied.

    One pass makes the delta; its norm is both checks: NaN or infinity anywhere in
    ``remote`` makes the norm non-finite (our snapshot is finite), and a norm beyond
    ``guard`` means an implausible jump. The mix then adds half of ``out``.
    """
    if remote.shape != snapshot.shape or remote.dtype != snapshot.dtype:
        raise UpdateRejected(
            f"weight vector {remote.dtype}{list(remote.shape)} does not match "
            f"ours {snapshot.dtype}{list(snapshot.shape)}"
        )
    np.subtract(remote, snapshot, out=out)
    dist = float(np.linalg.norm(out))
    if not math.isfinite(dist):
        raise UpdateRejected("weight vector holds NaN or infinity")
    limit = guard.max_relative_distance * snapshot_norm + guard.absolute_floor
    if dist > limit:
        raise UpdateRejected(f"weight vector implausibly far from ours ({dist:.3g} > {limit:.3g})")
    return out


def check_update(remote: np.ndarray, local: np.ndarray, guard: UpdateGuard = UpdateGuard()) -> None:
    """Raise ``UpdateRejected`` unless ``remote`` is finite, the right size, and plausible."""
    checked_delta(remote, local, float(np.linalg.norm(local)), np.empty_like(local), guard)


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
