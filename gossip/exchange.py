"""The push-pull exchange between two peers.

    initiator                                  responder
    EXCH_OFFER {schema, nbytes}   ------>      busy / other schema / quarantined?
                                                   -> EXCH_DECLINE {reason}
                                  <------      EXCH_ACCEPT
    EXCH_PAYLOAD [w_i]            <----->      EXCH_PAYLOAD [w_r]      (both directions at once)
    check, screen, mix(w_r - w_i)              check, screen, mix(w_i - w_r)

Each side copies its snapshot w piece by piece as it sends it, and turns the payload it
receives into the delta piece by piece as it arrives.

Both payloads are in flight at the same time, so an exchange costs about one transfer,
not two. A busy peer declines at once and the initiator tries another neighbour, so two
peers that pick each other never deadlock. Nothing here knows about torch: weights come
from a ``WeightStore``.

The hot path allocates nothing per exchange and leaves little for after the last byte:
the snapshot goes to a buffer the exchanger owns, the payload lands in one of the
transport's reusable receive buffers, and the delta against the snapshot (with the norms
that check it) is computed in that buffer, chunk by chunk, while the payload is still
arriving (``DeltaStream``). After the last byte only the check's verdict and one add
remain. Snapshot and add run on the event loop when the weights are free (no thread
hand-off); connections to neighbours are kept between exchanges.

Each side screens what it received on its own (``gossip.screening``, robust mixing): a
delta far beyond what neighbours recently sent is refused, a long one is scaled down in
place before the add (one more pass, only then), and a neighbour refused again and again
is quarantined: no exchange with it, neither offered nor answered, for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from p2p.framing import Frame, MsgType, show, text
from p2p.node import Node
from p2p.transport import Connection, ConnectionClosed, TransportError

from .averaging import MAX_LAYOUT, DeltaStream, UpdateGuard, UpdateRejected, judge, layout_diff
from .compress import (
    CODECS,
    OWN_NOT_FINITE,
    CompressedStream,
    Compressor,
    Packed,
    PayloadRefused,
    codec,
)
from .screening import RobustMixing, Screen, Verdict

log = logging.getLogger(__name__)

# Snapshots and adds of models up to this size may run on the event loop (a 64 MB copy is
# ~10 ms); larger ones always go to a worker thread, so the loop keeps answering pings.
INLINE_MAX = 64 << 20
# Peers (addresses we dialled, names that called us) remembered as running another model.
MAX_INCOMPATIBLE = 1024


class WeightStore(Protocol):
    """What the exchange needs from a model: a schema, the live flat weights, their lock.

    The training thread holds ``lock`` while it writes the weights (the optimizer update);
    the exchanger holds it to copy a snapshot out of ``array`` and to add a delta into it, so
    neither sees nor leaves a half-written vector. It tries that on the event loop first (a
    thread hand-off costs more than copying a small model) and waits for the lock in a
    worker thread only when an update holds it.
    """

    schema: str
    nbytes: int
    lock: threading.Lock
    array: np.ndarray  # the live weights, flat float32 (or a host mirror of them)

    # Optional, called under ``lock``: a store whose weights live elsewhere (a GPU) copies
    # them into ``array`` before it is read (``refresh_host``), and applies a delta added to
    # ``array`` to the real weights too (``push_delta``). Plain arrays need neither.


def _refresh(store: WeightStore) -> None:
    refresh = getattr(store, "refresh_host", None)
    if refresh is not None:
        refresh()


def _copy_out(store: WeightStore, out: np.ndarray) -> None:
    _refresh(store)
    np.copyto(out, store.array)


def _add_in(store: WeightStore, delta: np.ndarray) -> None:
    np.add(store.array, delta, store.array)
    push = getattr(store, "push_delta", None)
    if push is not None:
        push(delta)


def _encode_from(store: WeightStore, comp: Compressor) -> None:
    _refresh(store)
    comp.encode(store.array)


def _mix_compressed(
    store: WeightStore, stream: CompressedStream, frame: Frame, factor: float
) -> None:
    """``current += factor * (D(theirs) - D(ours))``, chunk by chunk: no full-size delta,
    unless the store mirrors its weights elsewhere (a GPU), which takes the delta whole."""
    push = getattr(store, "push_delta", None)
    push_chunk = getattr(store, "push_delta_chunk", None)
    if push is None or push_chunk is not None:
        for k, (start, end, _, _) in enumerate(stream.comp.spans):
            delta = stream.apply_chunk(frame.payload, k, store.array, factor)
            if push_chunk is not None:
                push_chunk(start, end, delta)
        return
    delta = np.zeros_like(store.array)
    for k in range(len(stream.comp.spans)):
        stream.apply_chunk(frame.payload, k, delta, factor)
    store.array += delta
    push(delta)


def _locked(lock: threading.Lock, fn: Callable[..., Any], *args: Any) -> None:
    with lock:
        fn(*args)


class _SnapshotPieces:
    """Copies the snapshot piece by piece under the already-held lock, for ``send_produced``.

    Each piece goes on the wire while the next is copied, so our payload starts moving after
    one piece instead of after the whole copy. The lock is released as soon as
    the copy is complete, or when the send gives up (``close``).
    """

    PIECE = 1 << 18  # float32 values: 1 MB

    def __init__(self, store: WeightStore, out: np.ndarray, stream: DeltaStream) -> None:
        self.store, self.out, self.stream = store, out, stream
        self.held = True

    def __iter__(self) -> Iterator[int]:
        src, out, n = self.store.array, self.out, self.out.size
        try:
            _refresh(self.store)
            for start in range(0, n, self.PIECE):
                end = min(n, start + self.PIECE)
                np.copyto(out[start:end], src[start:end])
                self.stream.valid = end
                yield end * out.itemsize
        finally:
            self.close()

    def close(self) -> None:
        if self.held:
            self.held = False
            self.store.lock.release()


def _cpu_timed(fn: Callable[..., None], *args: Any) -> float:
    t0 = time.thread_time()
    fn(*args)
    return time.thread_time() - t0


async def _finish_in_thread(fn: Callable[..., None], *args: Any) -> float:
    """``fn(*args)`` in a worker thread; return the CPU seconds it took there.

    On cancellation it still waits for the thread to end: the arguments are buffers the
    exchanger reuses, and one must not be handed out again while a thread may still be
    writing or reading it.
    """
    task = asyncio.ensure_future(asyncio.to_thread(_cpu_timed, fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


class IncompatiblePeer(Exception):
    """The other peer trains a different model; averaging with it is impossible."""


@dataclass(frozen=True)
class GossipConfig:
    # Deadline for an exchange = base + 2 x bytes / rate, the rate starting at min_rate:
    # 20 MB/s is far below loopback (>1 GB/s) and a LAN (>100 MB/s). Over slower links the
    # exchanger lowers it from what its exchanges achieve (``Exchanger.link_rate``).
    deadline_base: float = 2.0
    deadline_min_rate: float = 20e6
    # Seconds to wait for a neighbour to accept or decline an offer. A paused peer's kernel
    # still takes our bytes; this is what notices it never answers.
    accept_timeout: float = 2.0
    # Connections to neighbours kept open between exchanges (least recently used dropped).
    max_connections: int = 16
    guard: UpdateGuard = field(default_factory=UpdateGuard)
    # Screening, clipping and quarantine of received updates (gossip.screening).
    robust: RobustMixing = field(default_factory=RobustMixing)
    # Payload compression (gossip.compress): none, fp16, bf16 or int8. Every peer of a
    # swarm must use the same; an offer from a peer that compresses otherwise is declined.
    compress: str = "none"
    # Error feedback for compressed payloads (the residual carried to the next send).
    feedback: bool = True

    def __post_init__(self) -> None:
        if self.compress not in CODECS:
            raise ValueError(
                f"unknown compression {self.compress!r}: choose one of {', '.join(CODECS)}"
            )

    def deadline(self, nbytes: int) -> float:
        return self.deadline_base + 2 * nbytes / self.deadline_min_rate


# The lowest rate deadlines assume (bytes/s), however often exchanges time out: a 3.2 MB
# model then has 52 s.
MIN_LINK_RATE = 128e3


@dataclass
class Outcome:
    ok: bool
    peer: str
    reason: str = ""
    seconds: float = 0.0
    busy: bool = False
    declined: bool = False  # the neighbour answered the offer with a decline


# What ``Exchanger.counts`` counts (monitoring: trainer.metrics): exchanges we started,
# offers we answered (accepted and mixed) or declined, our offers a neighbour declined, and
# exchanges of either side that broke off (error, deadline, an update refused).
EXCHANGE_COUNTS = ("started", "answered", "declined", "declined_by_peer", "failed")


class Exchanger:
    """Runs exchanges for one peer and answers the ones other peers start."""

    def __init__(self, node: Node, store: WeightStore, config: GossipConfig | None = None) -> None:
        self.node = node
        self.store = store
        self.config = config or GossipConfig()
        self.ready = True  # False while catching up: we decline offers until then
        # The link rate our deadlines assume: the configured one until exchanges show the
        # links are slower (a 3.2 MB model over 10 Mbit/s needs 2.6 s, past the default
        # deadline): a timed-out exchange halves it, down to MIN_LINK_RATE; a completed one
        # sets it to half the rate it achieved, never above the configured one.
        self.link_rate = self.config.deadline_min_rate
        self.exchanges = 0  # completed (mixed), started or answered
        # Exchanges that began (an offer accepted), either side: the gossip period runs from
        # the start of the last one, so on a link where an exchange outlasts the period the
        # next one follows at once instead of a whole period after it ended.
        self.begun = 0
        self.typical_seconds = 0.0  # moving average of the exchanges we started
        self.rejected = 0
        self.counts = dict.fromkeys(EXCHANGE_COUNTS, 0)
        # How far apart we and our partners were: ||theirs - ours|| / ||ours|| of the last
        # exchange whose delta passed the checks, and the sum and count since the last
        # take_disagreement(). The stream sums both squares anyway; this keeps two floats.
        self.last_distance: float | None = None
        self._distance_sum = 0.0
        self._distance_count = 0
        # CPU seconds spent on exchanges, both those we start and those we answer: the
        # event loop's share (measured around each exchange, so it includes what else the
        # loop did meanwhile, little next to an exchange) plus the worker threads'.
        self.cpu_seconds = 0.0
        # Exchange payloads sent: what they weigh as float32 and what they weighed on the
        # wire. Equal while payloads travel uncompressed. Pull replies (catch-ups, float32
        # always) are counted apart: how many a run serves depends on its timing, not on
        # its codec.
        self.raw_payload_bytes = 0
        self.wire_payload_bytes = 0
        self.pull_replies = 0
        self.pull_reply_bytes = 0
        self.incompatible: dict[str, str] = {}  # addr or name -> why we stopped trying it
        # Robust mixing (gossip.screening): judges every delta before it is mixed, and
        # quarantines neighbours refused again and again. Keyed by advertised address.
        self.screen = Screen(self.config.robust)
        # False: take part in exchanges but mix nothing in. The chaos tool's poisoned peer
        # plays a hostile member this way: what it sends stays its poison.
        self.apply_received = True
        # Told what the screen decides: on_event("refused" | "quarantined", **fields).
        self.on_event: Callable[..., None] = lambda kind, **fields: None
        self._names: dict[str, str] = {}  # advertised address -> member name
        self.step_fn: Callable[[], int] = lambda: 0  # our training progress, sent with pulls
        self.training = True  # said in our offers; lingering peers wait for those to stop
        self.last_training_offer = time.monotonic()  # when a training peer last offered
        self._busy = False
        n = store.nbytes // 4
        found = codec(self.config.compress)
        # Compressed: what we last sent is our snapshot (its decoded values are what we mix
        # against), so no float32 snapshot is kept; otherwise one reused every exchange.
        self.comp = Compressor(found, n, self.config.feedback) if found is not None else None
        self._snap = np.empty(0 if self.comp else n, dtype=np.float32)
        self.wire_nbytes = self.comp.sent.nbytes if self.comp else store.nbytes
        self._inline = store.nbytes <= INLINE_MAX
        # Set when our own snapshot was not finite: until it is again, check it before
        # sending, so a diverged peer stops spreading NaN (receivers refuse it anyway).
        self._check_own = False
        self._conns: OrderedDict[str, Connection] = OrderedDict()
        # Our weights when they last took anything in (the start, a mix, a catch-up): how far
        # our own steps moved them since is the screen's scale for how far honest neighbours
        # may have drifted from us. One more copy of the weights, with robust mixing only.
        self._anchor: np.ndarray | None = None
        self._packed_anchor: Packed | None = None  # compressed: kept int8-coded
        self.reanchor()
        node.handlers[MsgType.EXCH_OFFER] = self._on_offer
        node.handlers[MsgType.PULL_REQ] = self._on_pull

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    @property
    def busy(self) -> bool:
        """In an exchange, or not exchanging now (catching up, done): offers would fail."""
        return self._busy or not self.ready

    # -- initiator -------------------------------------------------------------------------
    async def exchange(self, addr: str) -> Outcome:
        """One push-pull with ``addr``. Never raises for network trouble: see ``Outcome``."""
        if self._busy:
            return Outcome(False, addr, "we are busy", busy=True)
        if not self.ready:  # catching up, resyncing, or done (quiesce)
            return Outcome(False, addr, "not exchanging now", busy=True)
        if self.quarantined(addr):
            return Outcome(False, addr, f"quarantined: {self.screen.why(addr)}")
        self.counts["started"] += 1
        out = await self._exchange(addr)
        if out.declined:
            self.counts["declined_by_peer"] += 1
        elif not out.ok:
            self.counts["failed"] += 1
        return out

    async def _exchange(self, addr: str) -> Outcome:
        self._busy = True
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            async with asyncio.timeout(self.deadline()):
                conn = self._conns.pop(addr, None)
                if conn is not None and not conn.closed:
                    try:
                        return await self._exchange_on(conn, addr, t0)
                    except ConnectionClosed:
                        pass  # the neighbour dropped our idle connection; dial again
                conn = await self.node.open(addr)
                return await self._exchange_on(conn, addr, t0)
        except TimeoutError:
            self._timed_out()
            return Outcome(False, addr, "exchange deadline passed")
        except (TransportError, OSError) as exc:
            return Outcome(False, addr, str(exc))
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("refused weights from %s: %s", addr, exc)
            return Outcome(False, addr, f"refused: {exc}")
        finally:
            self.cpu_seconds += time.thread_time() - cpu0
            self._busy = False

    async def _exchange_on(self, conn: Connection, addr: str, t0: float) -> Outcome:
        kept = False
        try:
            await conn.send(MsgType.EXCH_OFFER, self._offer())
            async with asyncio.timeout(self.config.accept_timeout):
                reply = await conn.recv()
            if reply.type != MsgType.EXCH_ACCEPT:
                kept = reply.type == MsgType.EXCH_DECLINE
                return self._declined(addr, reply)
            self.begun += 1
            self._learn_name(addr, reply.header.get("name"))
            # The responder's payload is read by the connection's callbacks meanwhile, so
            # sending first and then waiting for the reply moves both at once.
            send_failed: TransportError | None = None
            try:
                try:
                    stream = await self._send_ours(conn)
                except TransportError as exc:
                    send_failed = exc  # closed on us: an ERROR sent before is still queued
                frame = await conn.recv()
            finally:
                conn.watch_payload(None)
            if frame.type == MsgType.ERROR:
                return Outcome(False, addr, text(frame.header.get("reason", "?")))
            if send_failed is not None:
                raise send_failed
            await self._apply(addr, stream, frame)
            kept = True
            seconds = time.perf_counter() - t0
            self._completed(seconds)
            return Outcome(True, addr, seconds=seconds)
        finally:
            if kept:
                self._keep(addr, conn)
            else:
                conn.close()

    async def quiesce(self, timeout: float) -> None:
        """Stop taking part: decline offers, start no exchange, and wait up to ``timeout``
        for the one in flight to end (a peer about to report and save its final weights)."""
        self.ready = False
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def deadline(self) -> float:
        """Seconds one exchange may take, at the link rate we have seen."""
        return self.config.deadline_base + 2 * self.wire_nbytes / self.link_rate

    def _pull_deadline(self) -> float:
        """A pull moves the float32 weights one way, once (a catch-up): it may take 8 times
        longer than an exchange at the rate we assume, before anything was measured."""
        return self.config.deadline_base + 2 * self.store.nbytes / (self.link_rate / 8)

    def _timed_out(self) -> None:
        self.link_rate = max(MIN_LINK_RATE, self.link_rate / 2)

    def _completed(self, seconds: float) -> None:
        t = self.typical_seconds
        self.typical_seconds = seconds if t == 0 else 0.8 * t + 0.2 * seconds
        achieved = self.wire_nbytes / max(seconds, 1e-3)  # both payloads move at once
        self.link_rate = max(MIN_LINK_RATE, min(self.config.deadline_min_rate, achieved / 2))

    def _keep(self, addr: str, conn: Connection) -> None:
        self._conns[addr] = conn
        while len(self._conns) > self.config.max_connections:
            _, old = self._conns.popitem(last=False)
            old.close()

    def _offer(self) -> dict[str, Any]:
        return {
            "schema": self.store.schema,
            "nbytes": self.store.nbytes,
            "name": self.node.name,
            "addr": self.node.addr,
            "training": self.training,
            "compress": self.config.compress,
        }

    def _declined(self, addr: str, reply: Frame) -> Outcome:
        reason = text(reply.header.get("reason", "?"))
        if reply.header.get("incompatible"):
            if addr not in self.incompatible:
                log.error("peer %s runs a different model: %s", addr, reason)
            self.incompatible[addr] = reason
        return Outcome(False, addr, reason, busy=bool(reply.header.get("busy")), declined=True)

    async def _with_weights(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` under the weights lock: on the loop if the weights are free (a
        thread hand-off costs more than a small model's copy), else in a worker thread."""
        lock = self.store.lock
        if self._inline and lock.acquire(blocking=False):
            try:
                fn(*args)
            finally:
                lock.release()
        else:
            self.cpu_seconds += await _finish_in_thread(_locked, lock, fn, *args)

    async def _take_snapshot(self) -> None:
        """Copy our weights into the snapshot buffer."""
        await self._with_weights(_copy_out, self.store, self._snap)
        if self._check_own:
            if not np.isfinite(np.dot(self._snap, self._snap)):
                raise UpdateRejected("our own weights are not finite; not exchanging")
            self._check_own = False

    def _stream(self, conn: Connection, valid: int | None = None) -> DeltaStream:
        """Start computing the delta of the payload ``conn`` is about to receive."""
        stream = DeltaStream(self._snap, 0.5, self.config.guard, anchor=self._anchor)
        if valid is not None:
            stream.valid = valid

        def progress(frame_type: int, buffer: memoryview, filled: int) -> None:
            if frame_type == MsgType.EXCH_PAYLOAD:
                stream.feed(buffer, filled)

        conn.watch_payload(progress)
        return stream

    async def _send_snapshot(self, conn: Connection) -> DeltaStream:
        """Snapshot our weights and send them; return the stream for the incoming payload.

        When the weights are free, the copy and the send are interleaved piece by piece.
        """
        if self._inline and not self._check_own and self.store.lock.acquire(blocking=False):
            stream = self._stream(conn, valid=0)
            pieces = _SnapshotPieces(self.store, self._snap, stream)
            try:
                await conn.send_produced(MsgType.EXCH_PAYLOAD, {}, self._snap, iter(pieces))
            finally:
                pieces.close()
            self._sent_payload(self._snap.nbytes)
            return stream
        await self._take_snapshot()
        stream = self._stream(conn)
        await conn.send(MsgType.EXCH_PAYLOAD, {}, [self._snap])
        self._sent_payload(self._snap.nbytes)
        return stream

    async def _send_ours(self, conn: Connection) -> DeltaStream | CompressedStream:
        if self.comp is None:
            return await self._send_snapshot(conn)
        # Encode under the weights lock (a pass over the weights, like the snapshot's copy),
        # then send the encoded buffer: it stays ours until the next exchange.
        await self._with_weights(_encode_from, self.store, self.comp)
        stream = CompressedStream(self.comp, self._packed_anchor)

        def progress(frame_type: int, buffer: memoryview, filled: int) -> None:
            if frame_type == MsgType.EXCH_PAYLOAD:
                stream.feed(buffer, filled)

        conn.watch_payload(progress)
        await conn.send(MsgType.EXCH_PAYLOAD, {}, [self.comp.sent])
        self._sent_payload(self.comp.sent.nbytes)
        return stream

    def _sent_payload(self, wire: int) -> None:
        self.raw_payload_bytes += self.store.nbytes
        self.wire_payload_bytes += wire

    @property
    def compression_ratio(self) -> float:
        """Raw over wire bytes of the exchange payloads sent so far (1.0 before any)."""
        return self.raw_payload_bytes / self.wire_payload_bytes if self.wire_payload_bytes else 1.0

    async def _apply(self, addr: str, stream: DeltaStream | CompressedStream, frame: Frame) -> None:
        """Judge the delta ``addr`` sent (finite, plausible, screened) and mix it in."""
        if isinstance(stream, CompressedStream):
            try:
                factor = self._judged_compressed(addr, stream, frame)
                self._note_distance(stream.dist_sq, stream.snap_sq)
                if factor is not None:
                    await self._with_weights(_mix_compressed, self.store, stream, frame, factor)
            finally:
                frame.release()
            self.exchanges += 1
            return
        try:
            delta = self._judged(addr, stream, frame)
            self._note_distance(stream.dist_sq, stream.snap_sq)
            if delta is not None:
                await self._mix(delta)
                await self._move_anchor(delta)
        finally:
            frame.release()
        self.exchanges += 1

    def _note_distance(self, dist_sq: float, snap_sq: float) -> None:
        """Record the relative distance of an exchange that passed the checks."""
        if snap_sq > 0 and math.isfinite(dist_sq) and math.isfinite(snap_sq):
            d = math.sqrt(dist_sq / snap_sq)
            self.last_distance = d
            self._distance_sum += d
            self._distance_count += 1

    def take_disagreement(self) -> float | None:
        """The mean relative distance to our partners since the last call (None if no
        exchange passed since): what a progress line reports as ``disagreement``."""
        if not self._distance_count:
            return None
        mean = self._distance_sum / self._distance_count
        self._distance_sum, self._distance_count = 0.0, 0
        return mean

    def _judged(self, addr: str, stream: DeltaStream, frame: Frame) -> np.ndarray | None:
        """The delta to mix (clipped if need be), None if we mix nothing in; raises
        ``UpdateRejected`` for a refused one."""
        delta: np.ndarray | None = None

        def check() -> None:
            nonlocal delta
            if frame.type != MsgType.EXCH_PAYLOAD or frame.payload.nbytes != self._snap.nbytes:
                raise UpdateRejected(f"{addr} sent a malformed payload")
            delta = stream.finish(np.frombuffer(frame.payload, dtype=np.float32))

        scale = self._screen_update(addr, check, stream)
        if scale is None or delta is None:
            return None
        if scale < 1.0:
            delta *= np.float32(scale)  # clipped: one pass, in place
        return delta

    def _judged_compressed(self, addr: str, stream: CompressedStream, frame: Frame) -> float | None:
        """The factor to mix the compressed delta with (1/2, clipped), None to mix
        nothing; raises ``UpdateRejected`` for a refused one."""

        def check() -> None:
            if frame.type != MsgType.EXCH_PAYLOAD:
                raise UpdateRejected(f"{addr} sent a malformed payload")
            try:
                stream.finish(frame.payload)
            except PayloadRefused as exc:
                why = str(exc)
                raise UpdateRejected(why if why == OWN_NOT_FINITE else f"{addr}: {why}") from None
            judge(stream.dist_sq, stream.snap_sq, self.config.guard)

        scale = self._screen_update(addr, check, stream)
        return None if scale is None else 0.5 * scale

    def _screen_update(
        self, addr: str, check: Callable[[], None], stream: DeltaStream | CompressedStream
    ) -> float | None:
        """``check()`` the payload (it raises ``UpdateRejected``), then screen the stream's
        norms: the factor to mix with (1, or below 1 when clipped), None to mix nothing
        (a poisoned peer of the chaos tool); raises ``UpdateRejected`` for a refused one."""
        screening = self.config.robust.enabled and self.apply_received
        try:
            check()
        except UpdateRejected as exc:
            if str(exc).startswith("our own"):
                self._check_own = True
                raise
            if not self.apply_received:
                return None
            if screening:
                self._screened(addr, self.screen.refuse(addr, str(exc), time.monotonic()))
            raise
        if not self.apply_received:
            return None
        if not screening:
            return 1.0
        # Once we stopped training, what we accept no longer says what honest deltas
        # look like (finished peers converge to nothing): the reference stays put.
        verdict = self.screen.judge(
            addr,
            stream.dist_sq,
            stream.snap_sq,
            time.monotonic(),
            record=self.training,
            remote_sq=stream.remote_sq,
            drift_sq=stream.moved_sq,
        )
        self._screened(addr, verdict)
        return verdict.scale

    def _screened(self, addr: str, verdict: Verdict) -> None:
        """Report a refusal (and a quarantine it started); raise ``UpdateRejected``."""
        if verdict.accepted:
            return
        name = self._names.get(addr, addr)
        fields: dict[str, Any] = {"subject": name, "addr": addr, "reason": verdict.reason}
        if math.isfinite(verdict.norm):
            fields.update(norm=round(verdict.norm, 6), limit=round(verdict.limit, 6))
        if verdict.reference is not None:
            fields["reference"] = round(verdict.reference, 6)
        self.on_event("refused", **fields)
        if verdict.quarantine > 0:
            log.warning("quarantined %s for %.0f s: %s", name, verdict.quarantine, verdict.reason)
            self.on_event(
                "quarantined",
                subject=name,
                addr=addr,
                seconds=round(verdict.quarantine, 3),
                refusals=self.screen.standings[addr].refused_in_row,
                reason=verdict.reason,
            )
        raise UpdateRejected(verdict.reason)

    def reanchor(self) -> None:
        """Measure our own movement from our current weights on: call when they were just
        replaced (a catch-up, a resync). Blocks on the weights lock."""
        if not self.config.robust.enabled:
            return
        if self.comp is not None:
            packed = self._packed_anchor or Packed(self.store.nbytes // 4)
            with self.store.lock:
                _refresh(self.store)
                packed.set_from(self.store.array)
            self._packed_anchor = packed
            return
        anchor = self._anchor if self._anchor is not None else np.empty_like(self._snap)
        with self.store.lock:
            _copy_out(self.store, anchor)
        self._anchor = anchor

    def quarantined(self, addr: str) -> float:
        """Seconds we still refuse to exchange with ``addr`` (0: we do exchange)."""
        if not (self.config.robust.enabled and self.apply_received):
            return 0.0
        return self.screen.quarantined(addr, time.monotonic())

    def _learn_name(self, addr: str, name: Any) -> None:
        if _ident(name) and len(self._names) < 4096:
            self._names[addr] = name

    async def _move_anchor(self, delta: np.ndarray) -> None:
        """anchor = snapshot + the delta just mixed: our weights as the mix left them (but
        for steps taken meanwhile), without touching the live weights or their lock."""
        if self._anchor is None:
            return
        if self._inline:
            np.add(self._snap, delta, out=self._anchor)
        else:
            self.cpu_seconds += await _finish_in_thread(np.add, self._snap, delta, self._anchor)

    async def _mix(self, delta: np.ndarray) -> None:
        """current += delta (already scaled): one pass, no temporary."""
        await self._with_weights(_add_in, self.store, delta)

    # -- responder -------------------------------------------------------------------------
    async def _on_offer(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if h.get("schema") != self.store.schema or h.get("nbytes") != self.store.nbytes:
            self.counts["declined"] += 1
            await self._refuse_schema(conn, h)
            return
        if h.get("compress", "none") != self.config.compress:
            theirs = text(h.get("compress"), 40)
            reason = (
                f"{theirs} compression offered, this peer uses {self.config.compress}: "
                "start every peer with the same --compress"
            )
            self.counts["declined"] += 1
            await conn.send(MsgType.EXCH_DECLINE, {"reason": reason, "incompatible": True})
            return
        if h.get("training") is True:
            self.last_training_offer = time.monotonic()
        # Who offers: its advertised address (what we dial it by), else its name.
        peer = _ident(h.get("addr")) or _ident(h.get("name")) or str(conn.peer)
        self._learn_name(peer, h.get("name"))
        if self._busy or not self.ready:
            self.counts["declined"] += 1
            await conn.send(MsgType.EXCH_DECLINE, {"busy": True, "reason": "busy"})
            return
        left = self.quarantined(peer)
        if left:
            reason = f"quarantined for {left:.0f} s more: {self.screen.why(peer)}"
            self.counts["declined"] += 1
            await conn.send(MsgType.EXCH_DECLINE, {"quarantined": True, "reason": reason})
            return
        self._busy = True
        cpu0 = time.thread_time()
        recv_task: asyncio.Task[Frame] | None = None
        try:
            async with asyncio.timeout(self.deadline()):
                await conn.send(MsgType.EXCH_ACCEPT, {"name": self.node.name})
                self.begun += 1
                recv_task = asyncio.create_task(conn.recv())
                try:
                    stream = await self._send_ours(conn)
                except UpdateRejected as exc:
                    self.counts["failed"] += 1
                    await conn.send(MsgType.ERROR, {"reason": str(exc)})
                    conn.close()
                    log.error("%s", exc)
                    return
                payload = await recv_task
                conn.watch_payload(None)
                await self._apply(peer, stream, payload)
                self.counts["answered"] += 1
        except UpdateRejected as exc:
            self.rejected += 1
            self.counts["failed"] += 1
            log.warning("refused weights from %s: %s", show(h.get("name")), exc)
        except (TimeoutError, TransportError, OSError) as exc:
            self.counts["failed"] += 1
            if isinstance(exc, TimeoutError):
                self._timed_out()
            conn.close()  # the initiator died or stalled; our weights are untouched
        finally:
            conn.watch_payload(None)
            if recv_task is not None and not recv_task.done():
                recv_task.cancel()
            self.cpu_seconds += time.thread_time() - cpu0
            self._busy = False

    async def _refuse_schema(self, conn: Connection, h: dict[str, Any]) -> None:
        reason = (
            f"model schema {show(h.get('schema'))} ({show(h.get('nbytes'))} bytes) does not "
            f"match ours {self.store.schema!r} ({self.store.nbytes} bytes): "
            "run every peer with the same task and model"
        )
        await conn.send(MsgType.EXCH_DECLINE, {"incompatible": True, "reason": reason})
        name = h.get("name")
        name = name[:100] if isinstance(name, str) else show(name)
        # Each name once, and a bounded number of names: the name is whatever the caller says.
        if name not in self.incompatible and len(self.incompatible) < MAX_INCOMPATIBLE:
            log.error("refused peer %s (%s): different model schema", name, conn.peer)
            self.incompatible[name] = "schema"

    # -- catch-up ----------------------------------------------------------------------------
    async def _on_pull(self, conn: Connection, frame: Frame) -> None:
        """Send our current weights to a peer that is catching up (it does not send its own)."""
        if frame.header.get("schema") != self.store.schema:
            ours = getattr(self.store, "layout", None)
            detail = ""
            if ours is not None and "layout" in frame.header:
                detail = f" ({layout_diff(ours, frame.header['layout'])})"
            reason = (
                f"model schema {show(frame.header.get('schema'))} does not match ours "
                f"{self.store.schema!r}{detail}: run every peer with the same task and model"
            )
            await conn.send(MsgType.ERROR, {"reason": reason, "incompatible": True})
            return
        step = self.step_fn()
        header = {"name": self.node.name, "step": step}
        if step < _int_or(frame.header.get("min_step"), 0):
            # A newcomer, and we have not trained as long as it asks: it holds about our
            # weights (same seed, same init), so they would travel for nothing.
            async with asyncio.timeout(self._pull_deadline()):
                await conn.send(MsgType.PULL_REPLY, header)
            return
        weights = np.empty(self.store.nbytes // 4, dtype=np.float32)  # pulls are rare
        await self._with_weights(_copy_out, self.store, weights)
        async with asyncio.timeout(self._pull_deadline()):
            await conn.send(MsgType.PULL_REPLY, header, [weights])
        self.pull_replies += 1
        self.pull_reply_bytes += weights.nbytes

    async def pull(self, addr: str, min_step: int = 0) -> tuple[np.ndarray | None, int]:
        """Fetch ``addr``'s current weights and step (for a new or restarted peer).

        With ``min_step``, a neighbour whose step is below it sends its step alone, and the
        weights returned are None: a newcomer asks with one gossip period, since a neighbour
        that has not trained that long holds about its own init. A neighbour from before
        ``min_step`` existed sends weights anyway.
        """
        async with asyncio.timeout(self._pull_deadline()):
            conn = await self.node.open(addr)
            try:
                request: dict[str, Any] = {"schema": self.store.schema}
                if min_step:
                    request["min_step"] = min_step
                layout = getattr(self.store, "layout", None)
                if layout is not None and len(layout) <= MAX_LAYOUT:
                    request["layout"] = layout
                await conn.send(MsgType.PULL_REQ, request)
                reply = await conn.recv()
            finally:
                conn.close()
        if reply.type == MsgType.ERROR and reply.header.get("incompatible"):
            raise IncompatiblePeer(f"{addr} refused us: {text(reply.header.get('reason', '?'))}")
        step = _int_or(reply.header.get("step"), 0)
        if reply.type == MsgType.PULL_REPLY and not reply.payload.nbytes and step < min_step:
            reply.release()
            return None, step
        if reply.type != MsgType.PULL_REPLY or reply.payload.nbytes != self.store.nbytes:
            reason = text(reply.header.get("reason", "?"))
            reply.release()
            raise TransportError(f"{addr}: bad pull reply: {reason}")
        remote = np.frombuffer(reply.payload, dtype=np.float32).copy()
        reply.release()
        if not np.isfinite(remote).all():
            raise UpdateRejected(f"{addr} sent non-finite weights")
        return remote, step


def _int_or(value: Any, default: int) -> int:
    """``value`` if a neighbour sent a plain int there (not a bool), else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# Longest address or name an offer may identify its sender by (a DNS name and a port).
MAX_IDENT = 300


def _ident(value: Any) -> str | None:
    """A sender's address or name from a header: a non-empty short string, else None (a
    nested or oversized value must neither reach a repr nor key per-peer state)."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_IDENT else None
