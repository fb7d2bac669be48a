"""Compressed weight payloads: fp16, bf16 and blockwise int8, with error feedback.

A payload is a sequence of chunks of ``CHUNK`` values, each decodable on its own, so a
receiver works through it while it arrives and never needs a float32 copy of the whole
vector (``CompressedStream``). Layouts, per chunk of ``m`` values:

    fp16   m float16 values                                     2 bytes a value
    bf16   m bfloat16 values (the top half of float32, rounded) 2 bytes a value
    int8   ceil(m / BLOCK) float32 scales, then m int8 codes     ~1.016 bytes a value

int8 is absmax-scaled per block of ``BLOCK`` values: ``code = rint(v / s)`` with
``s = max|v| / 127``, so a value's error is at most ``s / 2``, a 254th of its block's
largest magnitude.

**Error feedback** (the sender's residual, as in EF-SGD / 1-bit SGD): what a peer sends is
``C(w + e)`` and it keeps ``e <- (w + e) - D(C(w + e))``, the part compression dropped, for
its next send. Over many exchanges the decoded sends sum to the true weights plus a bounded
residual, so rounding errors do not accumulate in the swarm's average. Why not CHOCO-SGD's
public copies: CHOCO keeps, on every peer, a copy of each neighbour's public vector; with
random partners out of a swarm that is one model copy per peer met. The residual is kept
int8-coded too (a quarter of a model): its own rounding is a 254th of a value that is
itself at most half a step.

**Both sides mix decoded vectors**: the delta is ``D(C_remote) - D(C_ours)``, the same on
both sides with opposite signs, so a pairwise exchange conserves the sum of the weights
exactly, compressed or not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CODECS = ("none", "fp16", "bf16", "int8")
CHUNK = 1 << 16  # values per chunk: 64 K (128 KB of fp16, 66.5 KB of int8)
BLOCK = 256  # values per int8 scale


OWN_NOT_FINITE = "our own weights are not finite; not exchanging"


class PayloadRefused(ValueError):
    """A compressed payload that must not be applied (its lengths or scales lie)."""


@dataclass(frozen=True)
class Codec:
    """How ``n`` float32 values travel: chunk by chunk, each chunk on its own."""

    name: str

    def value_bytes(self, m: int) -> int:
        """Wire bytes of a chunk of ``m`` values."""
        if self.name == "int8":
            return 4 * math.ceil(m / BLOCK) + m
        return 2 * m

    def wire_nbytes(self, n: int) -> int:
        full, rest = divmod(n, CHUNK)
        return full * self.value_bytes(CHUNK) + (self.value_bytes(rest) if rest else 0)

    def chunks(self, n: int) -> Iterator[tuple[int, int, int, int]]:
        """``(first value, end value, first byte, end byte)`` of every chunk."""
        byte = 0
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            size = self.value_bytes(end - start)
            yield start, end, byte, byte + size
            byte += size

    def encode(self, v: np.ndarray, out: np.ndarray) -> None:
        """``v`` (float32, one chunk) into ``out`` (uint8, ``value_bytes(v.size)``)."""
        if self.name == "fp16":
            with np.errstate(over="ignore"):  # beyond 65504: inf, which receivers refuse
                np.copyto(out.view(np.float16), v, casting="unsafe")
        elif self.name == "bf16":
            bits = v.view(np.uint32)
            # Round to nearest even on the dropped 16 bits (NaN stays NaN: its top bits).
            rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
            np.copyto(out.view(np.uint16), rounded, casting="unsafe")
        else:
            _encode_int8(v, out)

    def decode(self, wire: np.ndarray, out: np.ndarray) -> None:
        """``wire`` (uint8, one chunk) into ``out`` (float32). Raises ``PayloadRefused`` for
        scales that are not finite or negative (int8)."""
        if self.name == "fp16":
            np.copyto(out, wire.view(np.float16))
        elif self.name == "bf16":
            bits = out.view(np.uint32)
            np.copyto(bits, wire.view(np.uint16))  # widen first: shifting a uint16 loses it
            bits <<= 16
        else:
            _decode_int8(wire, out)


def _encode_int8(v: np.ndarray, out: np.ndarray) -> None:
    m = v.size
    nblocks = math.ceil(m / BLOCK)
    scales = out[: 4 * nblocks].view(np.float32)
    codes = out[4 * nblocks :].view(np.int8)
    full = m // BLOCK
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if full:
            blocks = v[: full * BLOCK].reshape(full, BLOCK)
            np.max(np.abs(blocks), axis=1, out=scales[:full])
            scales[:full] /= 127
        if m > full * BLOCK:
            scales[full] = np.max(np.abs(v[full * BLOCK :])) / 127
        # A block of zeros has scale 0: its codes are 0 whatever the division gives.
        inv = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales > 0)
        q = np.repeat(inv, BLOCK)[:m]
        np.multiply(v, q, out=q)
        np.rint(q, out=q)
        np.clip(q, -127, 127, out=q)
        np.copyto(codes, np.nan_to_num(q, copy=False), casting="unsafe")


def _decode_int8(wire: np.ndarray, out: np.ndarray) -> None:
    m = out.size
    nblocks = math.ceil(m / BLOCK)
    scales = wire[: 4 * nblocks].view(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise PayloadRefused("int8 payload with a scale that is negative, NaN or infinite")
    codes = wire[4 * nblocks :].view(np.int8)
    np.copyto(out, codes)
    full = m // BLOCK
    if full:
        out[: full * BLOCK].reshape(full, BLOCK)[:] *= scales[:full, None]
    if m > full * BLOCK:
        out[full * BLOCK :] *= scales[full]


def codec(name: str) -> Codec | None:
    """The codec called ``name`` (None for "none"); ValueError for an unknown name."""
    if name not in CODECS:
        raise ValueError(f"unknown compression {name!r}: choose one of {', '.join(CODECS)}")
    return None if name == "none" else Codec(name)


INT8 = Codec("int8")


class Packed:
    """A float32 vector kept int8-coded, chunk by chunk (about a quarter of its size): the
    error feedback residual and robust mixing's anchor, where a 254th of a block's largest
    value is precision enough."""

    def __init__(self, n: int) -> None:
        self.spans = list(INT8.chunks(n))
        self.wire = np.zeros(INT8.wire_nbytes(n), dtype=np.uint8)  # all zeros: scale 0

    def get(self, k: int, out: np.ndarray) -> np.ndarray:
        _, _, b0, b1 = self.spans[k]
        _decode_int8(self.wire[b0:b1], out)
        return out

    def put(self, k: int, v: np.ndarray) -> None:
        _, _, b0, b1 = self.spans[k]
        _encode_int8(v, self.wire[b0:b1])

    def set_from(self, vector: np.ndarray) -> None:
        for k, (start, end, _, _) in enumerate(self.spans):
            self.put(k, vector[start:end])


class Compressor:
    """One peer's side of compressed exchanges: what it last sent (the payload, and its
    decoded values are what it mixes against), the error feedback residual, scratch."""

    def __init__(self, codec: Codec, n: int, feedback: bool = True) -> None:
        self.codec = codec
        self.n = n
        self.sent = np.zeros(codec.wire_nbytes(n), dtype=np.uint8)  # our last payload
        self.residual = Packed(n) if feedback else None
        self.spans = list(codec.chunks(n))
        size = min(n, CHUNK)
        self._v = np.empty(size, dtype=np.float32)
        self._r = np.empty(size, dtype=np.float32)
        self._o = np.empty(size, dtype=np.float32)
        self._e = np.empty(size, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes this side holds beyond scratch: the payload and the residual."""
        return self.sent.nbytes + (self.residual.wire.nbytes if self.residual is not None else 0)

    def encode_chunk(self, weights: np.ndarray, k: int) -> int:
        """Encode chunk ``k`` of ``weights`` (plus the residual) into ``sent``; update the
        residual; return the payload bytes complete so far."""
        start, end, b0, b1 = self.spans[k]
        v = self._v[: end - start]
        np.copyto(v, weights[start:end])
        if self.residual is not None:
            v += self.residual.get(k, self._e[: end - start])
        wire = self.sent[b0:b1]
        self.codec.encode(v, wire)
        if self.residual is not None:
            o = self._o[: end - start]
            self.codec.decode(wire, o)
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(v, o, out=v)
            self.residual.put(k, np.nan_to_num(v, copy=False))
        return b1

    def encode(self, weights: np.ndarray) -> None:
        for k in range(len(self.spans)):
            self.encode_chunk(weights, k)

    def decoded(self, wire: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``k`` of a payload, decoded (into scratch unless ``out``)."""
        start, end, b0, b1 = self.spans[k]
        target = out if out is not None else self._r[: end - start]
        self.codec.decode(wire[b0:b1], target)
        return target

    def own(self, k: int) -> np.ndarray:
        """Chunk ``k`` of what we last sent, decoded."""
        start, end, b0, b1 = self.spans[k]
        o = self._o[: end - start]
        self.codec.decode(self.sent[b0:b1], o)
        return o


class CompressedStream:
    """Judges a compressed payload while it arrives: per complete chunk, decode it and our
    own last payload, and sum ``||remote - ours||^2``, ``||ours||^2``, ``||remote||^2`` (and,
    with an anchor, what ``DeltaStream`` sums for ``moved_sq``). Nothing of the delta is
    stored: ``apply`` decodes again, chunk by chunk, when the verdict is in."""

    def __init__(self, comp: Compressor, anchor: Packed | None = None) -> None:
        self.comp = comp
        self.anchor = anchor
        self.nbytes = comp.sent.nbytes
        self.done = 0  # chunks judged
        self.dist_sq = 0.0
        self.snap_sq = 0.0
        self.remote_sq = 0.0
        self.cross = 0.0
        self.anchor_sq = 0.0
        self.refused: str | None = None

    def feed(self, buffer: memoryview, filled: int) -> None:
        if buffer.nbytes != self.nbytes or self.refused is not None:
            return  # not our payload's size: finish() refuses it
        wire = np.frombuffer(buffer, dtype=np.uint8)
        spans = self.comp.spans
        while self.done < len(spans) and spans[self.done][3] <= filled:
            self._judge_chunk(wire)

    def _judge_chunk(self, wire: np.ndarray) -> None:
        k = self.done
        self.done += 1
        try:
            o = self.comp.own(k)
        except PayloadRefused:  # we sent a NaN or infinite scale ourselves
            self.refused = OWN_NOT_FINITE
            return
        try:
            r = self.comp.decoded(wire, k)
        except PayloadRefused as exc:
            self.refused = str(exc)
            return
        with np.errstate(over="ignore", invalid="ignore"):
            self.remote_sq += float(np.dot(r, r))
            self.snap_sq += float(np.dot(o, o))
            if self.anchor is not None:
                start, end, _, _ = self.comp.spans[k]
                a = self.anchor.get(k, self.comp._e[: end - start])
                self.cross += float(np.dot(o, a))
                self.anchor_sq += float(np.dot(a, a))
            np.subtract(r, o, out=r)
            self.dist_sq += float(np.dot(r, r))

    @property
    def moved_sq(self) -> float | None:
        if self.anchor is None:
            return None
        return max(0.0, self.snap_sq - 2 * self.cross + self.anchor_sq)

    def finish(self, payload: memoryview) -> None:
        """Judge the rest; raise ``PayloadRefused`` for a payload of the wrong size or with
        lying scales. (Distances are judged by the caller.)"""
        if payload.nbytes != self.nbytes:
            raise PayloadRefused(
                f"compressed payload of {payload.nbytes} bytes, expected {self.nbytes}"
            )
        wire = np.frombuffer(payload, dtype=np.uint8)
        while self.done < len(self.comp.spans) and self.refused is None:
            self._judge_chunk(wire)
        if self.refused is not None:
            raise PayloadRefused(self.refused)

    def apply_chunk(
        self, payload: memoryview, k: int, target: np.ndarray, factor: float
    ) -> np.ndarray:
        """``target[chunk k] += factor * (remote - ours)`` (and the same into the anchor);
        returns that chunk's delta (scratch, valid until the next call)."""
        start, end, _, _ = self.comp.spans[k]
        r = self.comp.decoded(np.frombuffer(payload, dtype=np.uint8), k)
        o = self.comp.own(k)
        np.subtract(r, o, out=r)
        r *= np.float32(factor)
        target[start:end] += r
        if self.anchor is not None:  # the anchor: our weights as the mix left them
            self.anchor.put(k, np.add(o, r, out=o))
        return r
