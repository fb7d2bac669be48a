"""Sans-IO framing: bytes in, frames out; frames in, buffers out.

A frame on the wire is

    prefix   16 bytes  b"GT", type u8, flags u8, header length u32, payload length u64
    header   msgpack map (at most ``Limits.max_header`` bytes)
    payload  raw bytes: the segments listed in the header's "_seg" key, back to back

Tensor bytes travel as raw payload segments, so a send is a ``writelines`` of memoryviews
(no copy through msgpack) and a receive lands in one preallocated buffer per frame.
Every length is checked against ``Limits`` before anything is allocated; a stream that
breaks a rule cannot be resynchronised, so the decoder raises ``FrameError`` and the
connection is dropped.
"""

from __future__ import annotations

import enum
import reprlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAGIC = b"GT"
PREFIX = struct.Struct("!2sBBIQ")
# Protocol versions this build speaks; the handshake picks the highest common one.
PROTOCOL_VERSIONS = (1,)
_SCRATCH = 64 * 1024  # small reads go through a scratch buffer; large payloads bypass it
# Largest read straight into a payload. Bounded so that a consumer watching ``progress``
# gets the payload in pieces it can still work on while they are in cache, and so that the
# read that completes a frame (after which there is no more overlap) is a small one.
_DIRECT_MAX = 1 << 20


class MsgType(enum.IntEnum):
    """Message types. Append only: a number, once shipped, keeps its meaning."""

    HELLO = 1
    HELLO_OK = 2
    ERROR = 3
    SWIM = 4
    EXCH_OFFER = 5
    EXCH_ACCEPT = 6
    EXCH_DECLINE = 7
    EXCH_PAYLOAD = 8
    STATUS_REQ = 9
    STATUS = 10
    PULL_REQ = 11
    PULL_REPLY = 12
    CONTROL = 13
    CONTROL_OK = 14
    SEALED = 15  # an AES-GCM record of a sealed connection (p2p.secure)
    AUTH = 16  # the challenge-response of a connection's opening (p2p.secure)


class Kind(enum.IntEnum):
    """What a frame's bytes are spent on, for the byte counts (``transport.Stats``)."""

    WEIGHTS = 0  # the weight exchange and the catch-up pull
    MEMBERSHIP = 1  # SWIM
    CONTROL = 2  # everything else: handshake, status, control commands, errors
    # The records of a sealed connection, as the connection under it sees them. The sealed
    # layer counts each record again under the kind of the frame it carries, so this slot
    # is not one of the reported kinds: it is the sealed share of the totals.
    SEALED = 3


KINDS = ("weights", "membership", "control")  # the reported kinds, by Kind number
_WEIGHT_TYPES = (
    MsgType.EXCH_OFFER,
    MsgType.EXCH_ACCEPT,
    MsgType.EXCH_DECLINE,
    MsgType.EXCH_PAYLOAD,
    MsgType.PULL_REQ,
    MsgType.PULL_REPLY,
)


def _kind_table() -> bytes:
    table = bytearray([Kind.CONTROL]) * 256  # a type is a u8 on the wire
    for t in _WEIGHT_TYPES:
        table[t] = Kind.WEIGHTS
    table[MsgType.SWIM] = Kind.MEMBERSHIP
    table[MsgType.SEALED] = Kind.SEALED
    return bytes(table)


# The kind of each message type, indexed by type: the per-frame count is one lookup and
# one add, nothing allocated.
KIND_OF = _kind_table()


class FrameError(Exception):
    """The byte stream broke the framing rules; the connection must be closed."""


@dataclass(frozen=True)
class Limits:
    # Largest msgpack header. Headers carry metadata and membership lists only; 1 MiB holds
    # thousands of members while bounding what a garbage prefix can make us allocate.
    max_header: int = 1 << 20
    # Largest payload. 2 GiB fits a 500M-parameter float32 model; raise it for larger models.
    max_payload: int = 2 << 30
    # Most segments in one frame (one per tensor at most; we send one flat buffer).
    max_segments: int = 4096


class BufferPool:
    """Reusable receive buffers for large payloads, one free list per exact size.

    A model's weights arrive in frames of the same size every exchange; allocating (and
    zeroing, and page-faulting) a fresh 40 MB buffer each time cost more than the transfer.
    The decoder takes a buffer here; whoever consumes the frame gives it back with
    ``Frame.release()``. A frame never released is simply garbage-collected. Buffers of at
    most ``sizes`` sizes are kept, those given back last: the sizes of frames come from the
    peer, and one kept per size it invents would be memory it could pin without end.
    """

    def __init__(
        self, min_size: int = 1 << 20, keep: int = 4, keep_bytes: int = 64 << 20, sizes: int = 4
    ) -> None:
        self.min_size = min_size  # smaller payloads are plain allocations
        self.keep = keep  # free buffers kept per size ...
        self.keep_bytes = keep_bytes  # ... but at most this many bytes of them (at least one)
        self.sizes = sizes  # ... for this many sizes, the most recently given back
        self._free: dict[int, list[bytearray]] = {}  # in the order sizes were last given

    def take(self, nbytes: int) -> memoryview:
        free = self._free.get(nbytes)
        return memoryview(free.pop() if free else bytearray(nbytes))

    def give(self, view: memoryview) -> None:
        base = view.obj
        if isinstance(base, bytearray) and len(base) == view.nbytes:
            free = self._free.pop(view.nbytes, [])
            if len(free) < max(1, min(self.keep, self.keep_bytes // view.nbytes)):
                free.append(base)
            self._free[view.nbytes] = free
            while len(self._free) > self.sizes:
                del self._free[next(iter(self._free))]


@dataclass
class Frame:
    type: int
    header: dict[str, Any]
    payload: memoryview = field(default_factory=lambda: memoryview(b""))
    pool: BufferPool | None = None
    size: int = 0  # bytes it took on the wire: prefix, header and payload

    def release(self) -> None:
        """Hand the payload buffer back for reuse; the frame must not be used after."""
        if self.pool is not None:
            self.pool.give(self.payload)
            self.pool = None
        self.payload = memoryview(b"")

    @property
    def segments(self) -> list[memoryview]:
        out, pos = [], 0
        for n in self.header.get("_seg", ()):
            out.append(self.payload[pos : pos + n])
            pos += n
        return out


def _nbytes(buf: Any) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode(
    msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
) -> list[Any]:
    """Return the pieces of one frame, ready for ``writelines``. Segments are not copied."""
    views = [_nbytes(s) for s in segments]
    head = dict(header or {})
    if views:
        head["_seg"] = [v.nbytes for v in views]
    hb = msgpack.packb(head, use_bin_type=True)
    total = sum(v.nbytes for v in views)
    return [PREFIX.pack(MAGIC, int(msg_type), 0, len(hb), total) + hb, *views]


def encode_bytes(msg_type: int, header: dict[str, Any] | None = None, segments=()) -> bytes:
    return b"".join(bytes(p) for p in encode(msg_type, header, segments))


class Decoder:
    """Incremental frame decoder, usable with ``asyncio.BufferedProtocol``.

    ``get_buffer()`` says where the next received bytes should be written and
    ``buffer_updated(n)`` reports how many were; ``feed(data)`` does both for callers that
    already hold bytes. Complete frames are collected in ``frames``.

    ``counts``, when given, is a list indexed by ``Kind`` to which every byte consumed is
    added under the kind of its frame, as it is consumed (a frame's prefix once it is whole):
    its sum follows the bytes fed exactly, but for a prefix still incomplete.

    ``progress``, when set, is called as ``progress(frame_type, payload, filled)`` after each
    read that lands in a payload still being received, so its consumer can work on the
    first ``filled`` bytes while the rest arrives (gossip computes its delta that way).
    """

    progress: Callable[[int, memoryview, int], None] | None = None

    def __init__(
        self,
        limits: Limits | None = None,
        pool: BufferPool | None = None,
        counts: list[int] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.pool = pool
        self.counts = counts if counts is not None else [0] * len(Kind)
        # Kind of the frame being read, or of the last one read: after a sealed record is
        # fed, the kind of the frame it carried.
        self.kind: int = Kind.CONTROL
        self._pooled = False
        self.frames: list[Frame] = []
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._prefix = bytearray()
        self._head_len = 0
        self._head = bytearray()
        self._type = 0
        self._size = 0
        self._payload: memoryview | None = None
        self._got = 0
        self._direct = False
        self._header: dict[str, Any] = {}

    # -- BufferedProtocol side -------------------------------------------------------
    def get_buffer(self) -> memoryview:
        if self._payload is not None and self._payload.nbytes - self._got >= _SCRATCH:
            self._direct = True
            return self._payload[self._got : self._got + _DIRECT_MAX]
        self._direct = False
        return self._scratch

    def buffer_updated(self, n: int) -> None:
        if self._direct:
            self._got += n
            self.counts[self.kind] += n
            if self._payload is not None and self._got == self._payload.nbytes:
                self._finish()
        else:
            self._consume(self._scratch[:n])
        if self.progress is not None and self._payload is not None and self._got:
            self.progress(self._type, self._payload, self._got)

    def report_progress(self) -> None:
        """Call ``progress`` now for the payload in flight, if any (after setting it)."""
        if self.progress is not None and self._payload is not None and self._got:
            self.progress(self._type, self._payload, self._got)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data``; return and clear the frames completed so far."""
        self._consume(memoryview(data).cast("B"))
        out, self.frames = self.frames, []
        return out

    @property
    def needed(self) -> int:
        """Bytes that complete the part being read (prefix, header or payload): a reader of
        a stream that must not read past a frame asks for exactly this many."""
        if self._payload is not None:
            return self._payload.nbytes - self._got
        if self._head_len:
            return self._head_len - len(self._head)
        return PREFIX.size - len(self._prefix)

    @property
    def idle(self) -> bool:
        """True between frames (no partial frame buffered)."""
        return not self._prefix and self._payload is None and not self._head_len

    # -- state machine -----------------------------------------------------------------
    def _consume(self, data: memoryview) -> None:
        pos, end = 0, data.nbytes
        while pos < end:
            if self._payload is not None:
                take = min(end - pos, self._payload.nbytes - self._got)
                self._payload[self._got : self._got + take] = data[pos : pos + take]
                self._got += take
                self.counts[self.kind] += take
                pos += take
                if self._got == self._payload.nbytes:
                    self._finish()
            elif self._head_len:
                take = min(end - pos, self._head_len - len(self._head))
                self._head += data[pos : pos + take]
                self.counts[self.kind] += take
                pos += take
                if len(self._head) == self._head_len:
                    self._header_done()
            else:
                take = min(end - pos, PREFIX.size - len(self._prefix))
                self._prefix += data[pos : pos + take]
                pos += take
                if len(self._prefix) == PREFIX.size:
                    self._prefix_done()

    def _prefix_done(self) -> None:
        magic, mtype, flags, head_len, payload_len = PREFIX.unpack(self._prefix)
        self._prefix = bytearray()
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {magic!r} (not a gossip-train peer?)")
        if flags != 0:
            raise FrameError(f"unknown frame flags {flags:#x}")
        if head_len == 0 or head_len > self.limits.max_header:
            raise FrameError(f"header length {head_len} outside 1..{self.limits.max_header}")
        if payload_len > self.limits.max_payload:
            raise FrameError(f"payload length {payload_len} over limit {self.limits.max_payload}")
        self._type, self._head_len, self._plen = mtype, head_len, payload_len
        self._size = PREFIX.size + head_len + payload_len
        self._head = bytearray()
        self.kind = KIND_OF[mtype]
        self.counts[self.kind] += PREFIX.size

    def _header_done(self) -> None:
        try:
            header = msgpack.unpackb(
                bytes(self._head), raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0
            )
        except Exception as exc:
            raise FrameError(f"undecodable frame header: {exc}") from None
        self._head_len, self._head = 0, bytearray()
        if not isinstance(header, dict):
            raise FrameError("frame header is not a map")
        seg = header.get("_seg", [])
        if (
            not isinstance(seg, list)
            or len(seg) > self.limits.max_segments
            or not all(isinstance(n, int) and n >= 0 for n in seg)
            or sum(seg) != self._plen
        ):
            raise FrameError("frame segment list does not match its payload length")
        self._header = header
        # Allocation happens only here, after every length was checked.
        self._pooled = self.pool is not None and self._plen >= self.pool.min_size
        if self._pooled:
            assert self.pool is not None
            self._payload = self.pool.take(self._plen)
        else:
            self._payload = memoryview(bytearray(self._plen))
        self._got = 0
        if self._plen == 0:
            self._finish()

    def _finish(self) -> None:
        assert self._payload is not None
        pool = self.pool if self._pooled else None
        self.frames.append(Frame(self._type, self._header, self._payload, pool, self._size))
        self._payload, self._header, self._got, self._direct = None, {}, 0, False


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother = 3, 60, 60


def show(value: Any, limit: int = 100) -> str:
    """A peer's header value for an error reason or a log line: its ``repr``, bounded in
    length and depth. A plain ``repr`` of a value nested ~1000 deep (msgpack decodes up to
    1024 levels) raises RecursionError, and one of a 1 MiB string would make a reply that
    the peer's decoder refuses."""
    return _SHOW.repr(value)[:limit]


def text(value: Any, limit: int = 300) -> str:
    """A peer's value where a message wants text (a refusal's reason): a string as it is,
    clipped to ``limit`` characters; anything else through ``show``."""
    return value[:limit] if isinstance(value, str) else show(value, limit)
