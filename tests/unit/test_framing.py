import random

import msgpack
import numpy as np
import pytest

from p2p.framing import (
    KIND_OF,
    MAGIC,
    PREFIX,
    Decoder,
    FrameError,
    Kind,
    Limits,
    MsgType,
    encode_bytes,
)


def test_round_trip_with_segments_fed_byte_by_byte():
    a = np.arange(1000, dtype=np.float32)
    b = np.arange(7, dtype=np.int64)
    data = encode_bytes(MsgType.EXCH_PAYLOAD, {"k": "v", "n": 3}, [a, b])
    data += encode_bytes(MsgType.SWIM, {"t": "ping"})
    dec = Decoder()
    frames = []
    for i in range(len(data)):
        frames += dec.feed(data[i : i + 1])
    assert [f.type for f in frames] == [MsgType.EXCH_PAYLOAD, MsgType.SWIM]
    first = frames[0]
    assert first.header["k"] == "v" and first.header["n"] == 3
    seg_a, seg_b = first.segments
    assert np.array_equal(np.frombuffer(seg_a, np.float32), a)
    assert np.array_equal(np.frombuffer(seg_b, np.int64), b)
    assert frames[1].header == {"t": "ping"} and frames[1].payload.nbytes == 0
    assert dec.idle


def test_random_chunking_matches_whole_feed():
    rng = random.Random(7)
    payloads = [
        np.random.default_rng(i).random(rng.randint(0, 50000)).astype(np.float32) for i in range(5)
    ]
    data = b"".join(
        encode_bytes(MsgType.EXCH_PAYLOAD, {"i": i}, [p]) for i, p in enumerate(payloads)
    )
    dec = Decoder()
    frames, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 100000)
        frames += dec.feed(data[pos : pos + n])
        pos += n
    assert [f.header["i"] for f in frames] == list(range(5))
    for f, p in zip(frames, payloads, strict=True):
        assert bytes(f.payload) == p.tobytes()


def receive_buffered(dec: Decoder, data: memoryview, most: int) -> None:
    """Deliver ``data`` the way ``asyncio.BufferedProtocol`` does, at most ``most`` per read."""
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer()
        n = min(len(buf), len(data) - pos, most)
        buf[:n] = data[pos : pos + n]
        dec.buffer_updated(n)
        pos += n


def test_message_types_have_the_kinds_their_bytes_are_counted_under():
    weights = {t for t in MsgType if KIND_OF[t] == Kind.WEIGHTS}
    assert weights == {
        MsgType.EXCH_OFFER,
        MsgType.EXCH_ACCEPT,
        MsgType.EXCH_DECLINE,
        MsgType.EXCH_PAYLOAD,
        MsgType.PULL_REQ,
        MsgType.PULL_REPLY,
    }
    assert KIND_OF[MsgType.SWIM] == Kind.MEMBERSHIP and KIND_OF[MsgType.SEALED] == Kind.SEALED
    assert KIND_OF[MsgType.HELLO] == KIND_OF[MsgType.AUTH] == KIND_OF[MsgType.ERROR] == Kind.CONTROL
    assert KIND_OF[200] == Kind.CONTROL  # a type no build knows


def test_decoder_counts_every_byte_under_its_frame_s_kind_however_it_is_split():
    payload = encode_bytes(MsgType.EXCH_PAYLOAD, {}, [np.zeros(100_000, np.float32)])
    ping = encode_bytes(MsgType.SWIM, {"t": "ping"})
    hello = encode_bytes(MsgType.HELLO, {"versions": [1]})
    data = payload + ping + hello
    rng = random.Random(3)
    for _ in range(20):
        counts = [0] * len(Kind)
        dec = Decoder(counts=counts)
        frames, pos = [], 0
        while pos < len(data):
            n = rng.randint(1, 70_000)
            if rng.random() < 0.5:  # the BufferedProtocol path, straight into the payload
                buf = dec.get_buffer()
                n = min(n, buf.nbytes, len(data) - pos)
                buf[:n] = data[pos : pos + n]
                dec.buffer_updated(n)
            else:
                frames += dec.feed(data[pos : pos + n])
            pos += n
        assert counts == [len(payload), len(ping), len(hello), 0]
        assert [f.size for f in frames + dec.frames] == [len(payload), len(ping), len(hello)]


def test_buffered_protocol_path_writes_into_payload_directly():
    big = np.random.default_rng(0).random(300_000).astype(np.float32)
    dec = Decoder()
    receive_buffered(dec, memoryview(encode_bytes(MsgType.EXCH_PAYLOAD, {}, [big])), 70_000)
    (frame,) = dec.frames
    assert bytes(frame.payload) == big.tobytes()


def test_oversize_payload_is_refused_before_allocation():
    dec = Decoder(Limits(max_payload=1000))
    prefix = PREFIX.pack(MAGIC, MsgType.EXCH_PAYLOAD, 0, 5, 1 << 40)
    with pytest.raises(FrameError, match="over limit"):
        dec.feed(prefix)


def test_oversize_header_is_refused():
    dec = Decoder(Limits(max_header=100))
    with pytest.raises(FrameError, match="header length"):
        dec.feed(PREFIX.pack(MAGIC, 1, 0, 101, 0))


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"XX" + bytes(14), "magic"),
        (PREFIX.pack(MAGIC, 1, 0, 0, 0), "header length"),
        (PREFIX.pack(MAGIC, 1, 7, 4, 0), "flags"),
        (PREFIX.pack(MAGIC, 1, 0, 3, 0) + b"\xc1\xc1\xc1", "undecodable"),
        (PREFIX.pack(MAGIC, 1, 0, 2, 0) + msgpack.packb([1]), "not a map"),
    ],
)
def test_garbage_raises_frame_error(raw, match):
    with pytest.raises(FrameError, match=match):
        Decoder().feed(raw)


def test_segment_list_must_match_payload_length():
    head = msgpack.packb({"_seg": [10, 10]})
    raw = PREFIX.pack(MAGIC, 8, 0, len(head), 30) + head
    with pytest.raises(FrameError, match="segment"):
        Decoder().feed(raw)


def test_truncated_frame_stays_pending():
    data = encode_bytes(MsgType.SWIM, {"a": 1}, [b"12345"])
    dec = Decoder()
    assert dec.feed(data[:-1]) == []
    assert not dec.idle
    assert len(dec.feed(data[-1:])) == 1


def test_progress_reports_a_payload_while_it_arrives():
    big = np.arange(200_000, dtype=np.float32)
    seen: list[tuple[int, int, int]] = []
    dec = Decoder()
    dec.progress = lambda t, buf, filled: seen.append((t, buf.nbytes, filled))
    receive_buffered(dec, memoryview(encode_bytes(MsgType.EXCH_PAYLOAD, {}, [big])), 90_000)
    (frame,) = dec.frames
    assert bytes(frame.payload) == big.tobytes()
    fills = [f for _, _, f in seen]
    assert len(fills) >= 5 and fills == sorted(fills) and fills[-1] < big.nbytes
    assert {(t, size) for t, size, _ in seen} == {(MsgType.EXCH_PAYLOAD, big.nbytes)}


def test_buffer_pool_keeps_at_most_its_byte_budget_of_free_buffers():
    from p2p.framing import BufferPool

    pool = BufferPool(min_size=1, keep=4, keep_bytes=250)
    big = [pool.take(100) for _ in range(4)]
    small = [pool.take(10) for _ in range(6)]
    for view in big + small:
        pool.give(view)
    assert len(pool._free[100]) == 2  # 250 // 100: the byte budget binds before keep
    assert len(pool._free[10]) == 4  # keep binds
    huge = pool.take(1000)
    pool.give(huge)
    assert len(pool._free[1000]) == 1  # at least one is always kept
    assert pool.take(1000).obj is huge.obj  # and reused


def test_buffer_pool_keeps_the_sizes_given_back_last_only():
    # Found by benchmarks/fuzz.py: the exchange gives back every payload it was sent, whatever
    # its size, and the pool kept one buffer per size for ever, so a peer sending payloads
    # of new sizes pinned memory without bound.
    from p2p.framing import BufferPool

    pool = BufferPool(min_size=1, keep=2, sizes=2)
    model = pool.take(4000)
    pool.give(model)
    for n in range(1, 300):
        pool.give(pool.take(4000))  # the model's size, every exchange
        pool.give(pool.take(4000 + n))  # and one of a new size each time
    assert set(pool._free) == {4000, 4299}
    assert pool.take(4000).obj is model.obj  # the buffer in use all along is still reused


def test_needed_reads_exactly_one_frame_from_a_stream() -> None:
    """A reader that must not read past a frame (the chaos proxy) asks for ``needed``."""
    first = encode_bytes(MsgType.HELLO, {"name": "peer-0", "v": [1]})
    after = encode_bytes(MsgType.SWIM, {"x": 1})
    stream = memoryview(first + after)
    dec = Decoder()
    pos, frames = 0, []
    while not frames:
        n = dec.needed
        assert n > 0
        frames = dec.feed(stream[pos : pos + n])
        pos += n
    assert pos == len(first) and frames[0].header["name"] == "peer-0" and dec.idle
