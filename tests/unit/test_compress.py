"""Compressed payloads: round trips, error bounds, error feedback, chunked judging."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.compress import (
    BLOCK,
    CHUNK,
    CODECS,
    Codec,
    CompressedStream,
    Compressor,
    Packed,
    PayloadRefused,
    codec,
)

NAMES = [c for c in CODECS if c != "none"]


def roundtrip(name: str, v: np.ndarray) -> np.ndarray:
    c = Codec(name)
    out = np.empty(c.wire_nbytes(v.size), dtype=np.uint8)
    back = np.empty_like(v)
    for start, end, b0, b1 in c.chunks(v.size):
        c.encode(v[start:end], out[b0:b1])
        c.decode(out[b0:b1], back[start:end])
    return back


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 7, CHUNK + 300])
def test_round_trip_within_the_codec_s_error_bound(name, n):
    rng = np.random.default_rng(n)
    v = (rng.normal(size=n) * rng.choice([1e-3, 1.0, 50.0], size=n)).astype(np.float32)
    back = roundtrip(name, v)
    err = np.abs(back - v)
    if name == "int8":  # half a step of the block's scale
        for s in range(0, n, BLOCK):
            block = v[s : s + BLOCK]
            assert err[s : s + BLOCK].max() <= np.abs(block).max() / 127 / 2 * 1.0001 + 1e-30
    else:  # 11 (fp16) or 8 (bf16) significant bits
        rel = 2.0**-11 if name == "fp16" else 2.0**-8
        assert (err <= np.abs(v) * rel + 6.1e-5 * (name == "fp16")).all()


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=700))
@settings(max_examples=60, deadline=None)
def test_int8_never_errs_beyond_half_a_step_property(values):
    v = np.array(values, dtype=np.float32)
    back = roundtrip("int8", v)
    for s in range(0, v.size, BLOCK):
        step = np.abs(v[s : s + BLOCK]).max() / 127
        assert np.abs(back[s : s + BLOCK] - v[s : s + BLOCK]).max() <= step / 2 * 1.001 + 1e-30


def test_wire_sizes():
    assert Codec("fp16").wire_nbytes(1000) == 2000
    assert Codec("bf16").wire_nbytes(1000) == 2000
    assert Codec("int8").wire_nbytes(1000) == 1000 + 4 * 4  # ceil(1000 / 256) scales
    n = 10_000_000
    assert Codec("int8").wire_nbytes(n) < 0.26 * 4 * n


def test_unknown_codec_is_a_clear_error():
    assert codec("none") is None
    with pytest.raises(ValueError, match="unknown compression 'zip': choose one of none, fp16"):
        codec("zip")


def test_error_feedback_carries_the_residual_so_sends_sum_to_the_truth():
    # The same weights sent 200 times: without feedback every send has the same rounding
    # error; with it, the errors cancel and the mean of the decoded sends approaches w.
    rng = np.random.default_rng(0)
    w = rng.normal(size=5000).astype(np.float32)
    for feedback, bound in ((False, None), (True, 0.02)):
        comp = Compressor(Codec("int8"), w.size, feedback=feedback)
        total = np.zeros_like(w, dtype=np.float64)
        for _ in range(200):
            comp.encode(w)
            decoded = np.concatenate([comp.own(k).copy() for k in range(len(comp.spans))])
            total += decoded
        mean_err = np.abs(total / 200 - w).max()
        single = np.abs(roundtrip("int8", w) - w).max()
        if feedback:
            assert mean_err < bound * single, (mean_err, single)
        else:
            assert mean_err == pytest.approx(single, rel=1e-6)


def test_the_stream_judges_byte_by_byte_as_the_payload_arrives():
    rng = np.random.default_rng(1)
    n = CHUNK + 1000
    ours, theirs = rng.normal(size=(2, n)).astype(np.float32)
    a, b = Compressor(Codec("int8"), n), Compressor(Codec("int8"), n)
    a.encode(ours)
    b.encode(theirs)
    stream = CompressedStream(a)
    buf = bytearray(b.sent.nbytes)
    view = memoryview(buf)
    for i, byte in enumerate(b.sent.tobytes()):  # byte by byte, as a slow link delivers
        buf[i] = byte
        stream.feed(view, i + 1)
        if i == a.spans[0][3] - 1:
            assert stream.done == 1  # the first chunk was judged the moment it was whole
    assert stream.done == len(a.spans)  # everything judged while it arrived
    stream.finish(view)
    da = np.concatenate([a.own(k).copy() for k in range(len(a.spans))])
    db = np.concatenate([b.own(k).copy() for k in range(len(b.spans))])
    assert stream.dist_sq == pytest.approx(float(np.sum((db - da) ** 2.0)), rel=1e-4)
    target = da.copy()
    for k in range(len(a.spans)):
        stream.apply_chunk(view, k, target, 0.5)
    np.testing.assert_allclose(target, (da + db) / 2, atol=1e-5)


def test_lying_scales_and_lengths_are_refused():
    n = 2 * BLOCK
    a, b = Compressor(Codec("int8"), n), Compressor(Codec("int8"), n)
    a.encode(np.ones(n, dtype=np.float32))
    b.encode(np.ones(n, dtype=np.float32))
    for bad in (np.nan, -1.0, np.inf):
        wire = b.sent.copy()
        wire[:4] = np.frombuffer(np.float32(bad).tobytes(), dtype=np.uint8)
        with pytest.raises(PayloadRefused, match="scale"):
            CompressedStream(a).finish(memoryview(wire))
    with pytest.raises(PayloadRefused, match="expected"):
        CompressedStream(a).finish(memoryview(b.sent[:-1].copy()))


def test_packed_vectors_keep_a_254th():
    rng = np.random.default_rng(2)
    v = rng.normal(size=CHUNK + 5).astype(np.float32)
    p = Packed(v.size)
    p.set_from(v)
    out = np.empty(CHUNK, dtype=np.float32)
    for k, (s, e, _, _) in enumerate(p.spans):
        got = p.get(k, out[: e - s])
        assert np.abs(got - v[s:e]).max() <= np.abs(v).max() / 254 * 1.001
