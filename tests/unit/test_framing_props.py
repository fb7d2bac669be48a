"""Properties of the frame decoder over generated streams (hypothesis): where a stream is cut
does not change what it decodes to, and no bytes make it raise anything but FrameError."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.framing import Decoder, FrameError, Limits, encode_bytes

LIMITS = Limits(max_header=4096, max_payload=4096, max_segments=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "_seg"), values, max_size=5)
frames = st.lists(
    st.tuples(st.integers(0, 255), headers, st.lists(st.binary(max_size=300), max_size=3)),
    min_size=1,
    max_size=4,
)
cuts = st.lists(st.integers(1, 500), min_size=1, max_size=20)
# No per-example deadline: a loaded CI machine must not turn slowness into a failure.
quick = settings(max_examples=60, deadline=None)


def feed_in_pieces(dec: Decoder, data: bytes, sizes: list[int]) -> list[Any]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out += dec.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return out


@quick
@given(frames, cuts)
def test_any_cut_of_a_stream_decodes_to_the_frames_sent(sent: list[Any], sizes: list[int]) -> None:
    data = b"".join(encode_bytes(t, h, segs) for t, h, segs in sent)
    dec = Decoder(LIMITS)
    got = feed_in_pieces(dec, data, sizes)
    assert dec.idle
    assert len(got) == len(sent)
    for frame, (t, header, segs) in zip(got, sent, strict=True):
        assert frame.type == t
        assert {k: v for k, v in frame.header.items() if k != "_seg"} == header
        assert [bytes(s) for s in frame.segments] == [bytes(s) for s in segs]


@quick
@given(frames, st.integers(0, 10**6), st.integers(0, 255), cuts)
def test_a_changed_byte_gives_frames_or_frame_error_only(
    sent: list[Any], where: int, value: int, sizes: list[int]
) -> None:
    data = bytearray(b"".join(encode_bytes(t, h, segs) for t, h, segs in sent))
    data[where % len(data)] = value
    dec = Decoder(LIMITS)
    try:
        got = feed_in_pieces(dec, bytes(data), sizes)
    except FrameError:
        return
    for frame in got:
        assert isinstance(frame.header, dict)
        assert frame.payload.nbytes == sum(frame.header.get("_seg", [])) <= LIMITS.max_payload


@quick
@given(st.binary(max_size=3000), cuts)
def test_any_bytes_give_frames_or_frame_error_only(data: bytes, sizes: list[int]) -> None:
    dec = Decoder(LIMITS)
    try:
        feed_in_pieces(dec, data, sizes)
    except FrameError:
        pass
    assert dec.needed >= 1
