import msgpack
import numpy as np
import pytest

from gossip.averaging import (
    DeltaStream,
    UpdateRejected,
    check_update,
    layout_diff,
    mix,
    schema_hash,
    weighted_average,
)


def test_mix_is_the_pairwise_average_when_nothing_moved():
    a, b = np.array([1.0, 2.0, 3.0], np.float32), np.array([3.0, 6.0, -1.0], np.float32)
    ca, cb = a.copy(), b.copy()
    mix(ca, a, b)
    mix(cb, b, a)
    assert np.array_equal(ca, (a + b) / 2) and np.array_equal(cb, (a + b) / 2)


def test_mix_keeps_local_steps_taken_during_the_exchange():
    snap = np.zeros(4, np.float32)
    remote = np.full(4, 2.0, np.float32)
    current = snap + np.array([0.1, 0.2, 0.3, 0.4], np.float32)  # steps taken meanwhile
    mix(current, snap, remote)
    np.testing.assert_allclose(current, 1.0 + np.array([0.1, 0.2, 0.3, 0.4]), rtol=1e-6)


def test_repeated_pairwise_mixing_converges_to_the_mean():
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=10).astype(np.float64) for _ in range(8)]
    mean = np.mean(vecs, axis=0)
    for _ in range(400):
        i, j = rng.choice(8, 2, replace=False)
        si, sj = vecs[i].copy(), vecs[j].copy()
        mix(vecs[i], si, sj)
        mix(vecs[j], sj, si)
        np.testing.assert_allclose(np.mean(vecs, axis=0), mean, atol=1e-12)  # sum preserved
    assert max(np.abs(v - mean).max() for v in vecs) < 1e-6


def test_weighted_average_closed_form():
    out = weighted_average([np.array([0.0, 4.0]), np.array([4.0, 0.0])], [1, 3])
    np.testing.assert_allclose(out, [3.0, 1.0])
    with pytest.raises(ValueError):
        weighted_average([], [])


def test_check_update_rejects_non_finite_wrong_size_and_absurd():
    local = np.ones(5, np.float32)
    check_update(local * 1.5, local)
    bad = local.copy()
    bad[2] = np.nan
    with pytest.raises(UpdateRejected, match="NaN"):
        check_update(bad, local)
    with pytest.raises(UpdateRejected, match="does not match"):
        check_update(np.ones(4, np.float32), local)
    with pytest.raises(UpdateRejected, match="implausibly"):
        check_update(local * 1e6, local)


def test_schema_hash_sees_names_shapes_dtypes():
    base = [("w", (3, 4), "float32"), ("b", (4,), "float32")]
    assert schema_hash(base) == schema_hash(list(base))
    assert schema_hash(base) != schema_hash([("w", (4, 3), "float32"), ("b", (4,), "float32")])
    assert schema_hash(base) != schema_hash([("w", (3, 4), "float16"), ("b", (4,), "float32")])
    assert schema_hash(base) != schema_hash([("x", (3, 4), "float32"), ("b", (4,), "float32")])


def _stream_through(stream, remote: np.ndarray, rng) -> np.ndarray:
    """Deliver ``remote`` into a receive buffer in random pieces, as a transport would."""
    buf = memoryview(bytearray(remote.nbytes))
    data, filled = memoryview(remote.tobytes()), 0
    while filled < remote.nbytes:
        n = min(int(rng.integers(1, 300_000)), remote.nbytes - filled)
        buf[filled : filled + n] = data[filled : filled + n]
        filled += n
        if filled < remote.nbytes:
            stream.feed(buf, filled)
    return stream.finish(np.frombuffer(buf, dtype=np.float32))


def test_delta_stream_in_pieces_equals_the_one_shot_delta():
    rng = np.random.default_rng(5)
    snap = rng.normal(size=700_001).astype(np.float32)  # odd size: pieces split floats
    remote = (snap + rng.normal(scale=0.1, size=snap.size)).astype(np.float32)
    stream = DeltaStream(snap, 0.5, chunk=64 << 10)
    delta = _stream_through(stream, remote, rng)
    assert stream.done == snap.size
    np.testing.assert_array_equal(delta, np.float32(0.5) * (remote - snap))
    assert stream.dist_sq == pytest.approx(float(np.sum((remote - snap) ** 2.0)), rel=1e-4)
    assert stream.snap_sq == pytest.approx(float(np.sum(snap.astype(np.float64) ** 2)), rel=1e-4)
    assert stream.remote_sq == pytest.approx(float(np.sum(remote.astype(np.float64) ** 2)), 1e-4)
    assert stream.cross == stream.anchor_sq == 0.0  # no anchor, nothing summed for it


def test_delta_stream_measures_our_movement_from_an_anchor():
    rng = np.random.default_rng(8)
    anchor = rng.normal(size=200_003).astype(np.float32)
    snap = (anchor + rng.normal(scale=0.05, size=anchor.size)).astype(np.float32)
    remote = (anchor + rng.normal(scale=0.05, size=anchor.size)).astype(np.float32)
    stream = DeltaStream(snap, 0.5, chunk=32 << 10, anchor=anchor)
    _stream_through(stream, remote, rng)
    moved = float(np.sum((snap - anchor).astype(np.float64) ** 2))
    assert stream.moved_sq == pytest.approx(moved, rel=1e-3)
    assert DeltaStream(snap).moved_sq is None


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda r: r.__setitem__(-1, np.nan), "NaN or infinity"),  # in the very last chunk
        (lambda r: r.__setitem__(10, np.inf), "NaN or infinity"),
        (lambda r: r.__imul__(1000), "implausibly far"),
    ],
)
def test_delta_stream_refuses_bad_vectors(spoil, match):
    rng = np.random.default_rng(6)
    snap = rng.normal(size=300_000).astype(np.float32)
    remote = snap.copy()
    spoil(remote)
    with pytest.raises(UpdateRejected, match=match):
        _stream_through(DeltaStream(snap, 0.5, chunk=32 << 10), remote, rng)


def test_delta_stream_knows_our_own_weights_are_bad_and_sizes():
    snap = np.ones(1000, np.float32)
    snap[7] = np.nan
    with pytest.raises(UpdateRejected, match="our own weights"):
        DeltaStream(snap).finish(np.ones(1000, np.float32))
    stream = DeltaStream(np.ones(1000, np.float32), chunk=16)
    stream.feed(memoryview(bytearray(12)), 12)  # another frame's buffer: ignored
    assert stream.done == 0
    with pytest.raises(UpdateRejected, match="does not match"):
        stream.finish(np.ones(999, np.float32))


def test_layout_diff_names_what_is_malformed_and_never_raises():
    ours = [["fc.weight", [4, 3], "torch.float32"], ["fc.bias", [4], "torch.float32"]]
    deep = msgpack.unpackb(b"\x91" * 1000 + b"\x80")  # too deep for repr()
    assert layout_diff(ours, ours) == "the layouts agree but the hashes differ"
    assert layout_diff(ours, 5) == "their model's layout is not known"
    assert (
        layout_diff(ours, [["fc.weight", 12, "torch.float32"]]) == "tensor 0 of theirs has no shape"
    )
    assert layout_diff(ours, [["fc.weight", None, "f"]]) == "tensor 0 of theirs has no shape"
    assert layout_diff(ours, [[1, 2]]) == "tensor 0 of theirs is malformed"
    said = layout_diff(ours, [[deep, [deep], "x" * 100_000]])
    assert said.startswith("tensor 0: ours is fc.weight [4, 3] torch.float32, yours is [[[")
    assert len(said) < 400
