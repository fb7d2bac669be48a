"""Partitioning: every peer computes its shard alone, and the shards fit together."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.partition import Scheme, parse_scheme, partition, partition_all

# 10 classes of uneven size, shuffled, like a real label array.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), np.arange(300, 400, 10)))


def label_skew(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean total-variation distance between each peer's label mix and the global one."""
    k = int(labels.max()) + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    dists = [np.bincount(labels[s], minlength=k) / len(s) for s in shards]
    return float(np.mean([0.5 * np.abs(d - glob).sum() for d in dists]))


def assert_exact_cover(shards: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == n  # disjoint: nothing counted twice ...
    assert np.array_equal(np.sort(joined), np.arange(n))  # ... and nothing left out


def test_parse_scheme_accepts_valid() -> None:
    assert parse_scheme("iid") == Scheme("iid", math.inf)
    assert parse_scheme(" IID ") == Scheme("iid", math.inf)
    assert parse_scheme("dirichlet:0.5") == Scheme("dirichlet", 0.5)
    assert parse_scheme("dirichlet:1e-1").alpha == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dirichlet:x", r"partition 'dirichlet:x': ALPHA must be a positive number"),
        ("dirichlet:", r"ALPHA must be a positive number"),
        ("dirichlet", r"ALPHA must be a positive number"),
        ("dirichlet:0", r"ALPHA must be a positive number"),
        ("dirichlet:-1", r"ALPHA must be a positive number"),
        ("dirichlet:nan", r"ALPHA must be a positive number"),
        ("dirichlet:inf", r"ALPHA must be a positive number"),
        ("shards:2", r"partition 'shards:2': unknown scheme \(use one of iid, dirichlet:ALPHA\)"),
        ("", r"unknown scheme"),
    ],
)
def test_parse_scheme_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_scheme(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_peers", [1, 3, 7, 16])
def test_iid_disjoint_covering_near_equal(num_peers: int) -> None:
    shards = [partition(LABELS, num_peers, i, "iid", seed=5) for i in range(num_peers)]
    assert_exact_cover(shards, len(LABELS))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)  # sorted, no repeats


def test_partition_is_deterministic_and_seeded() -> None:
    for scheme in ("iid", "dirichlet:0.3"):
        a = partition_all(LABELS, 5, scheme, seed=11)
        b = [partition(LABELS, 5, i, scheme, seed=11) for i in range(5)]
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        c = partition_all(LABELS, 5, scheme, seed=12)
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 10.0])
def test_dirichlet_disjoint_covering_nonempty(alpha: float) -> None:
    shards = partition_all(LABELS, 8, f"dirichlet:{alpha}", seed=2, min_samples=32)
    assert_exact_cover(shards, len(LABELS))
    assert min(len(s) for s in shards) >= 32
    for s in shards:
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)


def test_dirichlet_small_alpha_skews_labels_more_than_iid() -> None:
    iid = label_skew(LABELS, partition_all(LABELS, 8, "iid", seed=3))
    large = label_skew(LABELS, partition_all(LABELS, 8, "dirichlet:100", seed=3))
    small = label_skew(LABELS, partition_all(LABELS, 8, "dirichlet:0.1", seed=3))
    assert iid < 0.1 and large < 0.15
    assert small > 0.5  # most of a peer's data comes from a few classes
    # With small alpha, a typical peer is missing several classes outright.
    shards = partition_all(LABELS, 8, "dirichlet:0.1", seed=3)
    missing = [10 - len(np.unique(LABELS[s])) for s in shards]
    assert np.mean(missing) >= 3


def test_dirichlet_redraws_until_every_peer_has_min_samples() -> None:
    # Tiny alpha with many peers leaves some peer nearly empty on most draws.
    first = partition_all(LABELS, 16, "dirichlet:0.05", seed=4, min_samples=1)
    assert min(len(s) for s in first) < 40
    shards = partition_all(LABELS, 16, "dirichlet:0.05", seed=4, min_samples=40)
    assert min(len(s) for s in shards) >= 40
    assert_exact_cover(shards, len(LABELS))


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"peer_index 4 not in \[0, 4\)"):
        partition(LABELS, 4, 4, "iid", seed=0)
    with pytest.raises(ValueError, match=r"num_peers must be >= 1"):
        partition_all(LABELS, 0, "iid", seed=0)
    with pytest.raises(ValueError, match=r"cannot give 10 peers 1000 each"):
        partition_all(LABELS, 10, "iid", seed=0, min_samples=1000)
    with pytest.raises(ValueError, match=r"labels must be 1-D integers"):
        partition_all(LABELS.astype(float), 2, "iid", seed=0)
    with pytest.raises(ValueError, match=r"use a larger ALPHA or fewer peers"):
        partition_all(LABELS, 64, "dirichlet:0.01", seed=0, min_samples=50)
    with pytest.raises(ValueError, match=r"ALPHA must be a positive number"):
        partition(LABELS, 2, 0, "dirichlet:zero", seed=0)
