"""Deterministic data partitioning: every peer computes its own shard with no coordination.

All peers run the same seeded computation over the same labels and keep only their slice, so
shards are disjoint and cover the data as long as the peers agree on (labels, num_peers,
scheme, seed) and run the same numpy version (numpy's Dirichlet sampler has changed across
major versions; PCG64 streams have not).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet:ALPHA")

# Dirichlet draws that leave a peer with fewer than min_samples are redrawn; after this many
# tries the alpha/peer-count combination is reported as infeasible instead of looping forever.
MAX_DIRICHLET_TRIES = 1000


@dataclass(frozen=True)
class Scheme:
    """A parsed partition scheme."""

    kind: str  # "iid" or "dirichlet"
    alpha: float = math.inf  # Dirichlet concentration; small = skewed labels, inf for iid


def parse_scheme(s: str) -> Scheme:
    """Parse "iid" or "dirichlet:ALPHA" (ALPHA a positive finite number), else ValueError."""
    text = s.strip().lower()
    if text == "iid":
        return Scheme("iid")
    kind, sep, arg = text.partition(":")
    if kind != "dirichlet":
        raise ValueError(f"partition {s!r}: unknown scheme (use one of {', '.join(SCHEMES)})")
    try:
        alpha = float(arg) if sep else math.nan
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"partition {s!r}: ALPHA must be a positive number")
    return Scheme("dirichlet", alpha)


def _iid(n: int, num_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), num_peers)


def _dirichlet_once(
    labels: np.ndarray, num_peers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw of the usual non-iid recipe (Hsu et al. 2019; Yurochkin et al. 2019).

    Per class, shuffle its samples and cut them among peers in proportions drawn from
    Dirichlet(alpha). As in the widely used reference code, a peer already holding its fair
    share (n / num_peers) gets no more of later classes, which keeps shard sizes from
    diverging by orders of magnitude while keeping the label skew.
    """
    n = len(labels)
    shards: list[list[np.ndarray]] = [[] for _ in range(num_peers)]
    sizes = np.zeros(num_peers, dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_peers, alpha))
        p = np.where(sizes < n / num_peers, p, 0.0)
        total = p.sum()
        # If every peer is full (only possible for the last classes), fall back to even shares.
        p = p / total if total > 0 else np.full(num_peers, 1.0 / num_peers)
        cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
        for peer, part in enumerate(np.split(members, cuts)):
            shards[peer].append(part)
            sizes[peer] += len(part)
    return [np.concatenate(s) for s in shards]


def _dirichlet(
    labels: np.ndarray, num_peers: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    for attempt in range(MAX_DIRICHLET_TRIES):
        shards = _dirichlet_once(labels, num_peers, alpha, rng)
        smallest = min(len(s) for s in shards)
        if smallest >= min_samples:
            if attempt:
                log.debug("dirichlet partition redrawn %d times for min %d", attempt, min_samples)
            return shards
    raise ValueError(
        f"partition dirichlet:{alpha:g}: no draw in {MAX_DIRICHLET_TRIES} gave all {num_peers}"
        f" peers >= {min_samples} samples; use a larger ALPHA or fewer peers"
    )


def partition_all(
    labels: np.ndarray, num_peers: int, scheme: str, seed: int, *, min_samples: int = 1
) -> list[np.ndarray]:
    """Every peer's shard (sorted int64 indices), as each peer would compute its own."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"partition: labels must be 1-D integers, got {labels.dtype} {labels.shape}"
        )
    if num_peers < 1:
        raise ValueError(f"partition: num_peers must be >= 1, got {num_peers}")
    if len(labels) < num_peers * max(min_samples, 1):
        raise ValueError(
            f"partition: {len(labels)} samples cannot give {num_peers} peers"
            f" {max(min_samples, 1)} each"
        )
    parsed = parse_scheme(scheme)
    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        shards = _iid(len(labels), num_peers, rng)
    else:
        shards = _dirichlet(labels, num_peers, parsed.alpha, max(min_samples, 1), rng)
    return [np.sort(s).astype(np.int64) for s in shards]


def partition(
    labels: np.ndarray,
    num_peers: int,
    peer_index: int,
    scheme: str,
    seed: int,
    *,
    min_samples: int = 1,
) -> np.ndarray:
    """This peer's shard of the data: sorted int64 indices into `labels`.

    "iid" splits a seeded permutation into num_peers near-equal disjoint shards (sizes differ
    by at most one). "dirichlet:ALPHA" gives each peer a label distribution drawn from
    Dirichlet(ALPHA), redrawing until every peer holds at least min_samples (pass the batch
    size so every peer has a full batch). Same arguments, same shards on every peer.
    """
    if not 0 <= peer_index < num_peers:
        raise ValueError(f"partition: peer_index {peer_index} not in [0, {num_peers})")
    return partition_all(labels, num_peers, scheme, seed, min_samples=min_samples)[peer_index]


def labels_of(dataset: Any) -> np.ndarray | None:
    """Integer class labels of a map-style data set, where they can be read without a pass.

    A ``TensorDataset`` whose last tensor is 1-D integers, or a data set with a ``targets``
    attribute (torchvision's convention); None otherwise.
    """
    for found in (getattr(dataset, "targets", None), _last_tensor(dataset)):
        if found is None:
            continue
        arr = np.asarray(found.numpy() if hasattr(found, "numpy") else found)
        if arr.ndim == 1 and arr.dtype.kind in "iu":
            return arr
    return None


def _last_tensor(dataset: Any) -> Any:
    tensors = getattr(dataset, "tensors", None)
    return tensors[-1] if isinstance(tensors, tuple) and tensors else None


def split(
    dataset: Any,
    peer: int,
    peers: int,
    scheme: str = "iid",
    seed: int = 0,
    *,
    labels: Any = None,
    min_samples: int = 1,
) -> Any:
    """This peer's part of ``dataset``: a ``torch.utils.data.Subset``, the same on every peer.

    For tasks whose ``data(peer, peers)`` cuts one data set among the peers. ``iid`` needs
    nothing but the length; ``dirichlet:ALPHA`` needs integer class labels, taken from
    ``labels`` or read off the data set (see ``labels_of``). Deterministic from ``seed``:
    every peer computes the same disjoint parts and keeps its own.
    """
    from torch.utils.data import Subset

    found: np.ndarray | None
    if parse_scheme(scheme).kind == "iid":
        found = np.zeros(len(dataset), dtype=np.int64)
    else:
        found = labels_of(dataset) if labels is None else np.asarray(labels)
        if found is None:
            raise ValueError(
                f"partition {scheme!r} needs class labels: pass labels= to split(), or use iid"
            )
        if len(found) != len(dataset):
            raise ValueError(f"split: {len(found)} labels for {len(dataset)} samples")
    indices = partition(found, peers, peer, scheme, seed, min_samples=min_samples)
    return Subset(dataset, indices.tolist())
