"""The push-pull exchange between two peers.

    initiator                                  responder
    EXCH_OFFER {schema, nbytes}   ------>      busy / other schema?  -> EXCH_DECLINE {reason}
    snapshot w_i (meanwhile)      <------      EXCH_ACCEPT, then snapshot w_r
    EXCH_PAYLOAD [w_i]            <----->      EXCH_PAYLOAD [w_r]      (both directions at once)
    check, mix(w_r - w_i)                      check, mix(w_i - w_r)

Both payloads are in flight at the same time, so an exchange costs about one transfer,
not two. A busy peer declines at once and the initiator tries another neighbour, so two
peers that pick each other never deadlock. Nothing here knows about torch: weights come
from a ``WeightStore``.

The hot path allocates nothing per exchange: snapshots and deltas go to buffers the
exchanger owns, payloads land in the transport's reusable receive buffers, the check and
the delta are one pass, and connections to neighbours are kept between exchanges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from p2p.framing import Frame, MsgType
from p2p.node import Node
from p2p.transport import Connection, ConnectionClosed, TransportError

from .averaging import UpdateGuard, UpdateRejected, checked_delta

log = logging.getLogger(__name__)

# Checks of payloads below this size run on the event loop: handing them to a worker
# thread costs more than the check (0.3 ms for 1M floats).
INLINE_MAX = 8 << 20


class WeightStore(Protocol):
    """What the exchange needs from a model: a schema, a snapshot, an in-place add.

    Both methods may block until the current training step ends; the exchanger calls
    them from a worker thread.
    """

    schema: str
    nbytes: int

    def snapshot_into(self, out: np.ndarray) -> None:
        """Copy the current flat float32 weights into ``out``."""
        ...

    def add_scaled(self, delta: np.ndarray, alpha: float) -> None:
        """current += alpha * delta."""
        ...


class IncompatiblePeer(Exception):
    """The other peer trains a different model; averaging with it is impossible."""


@dataclass(frozen=True)
class GossipConfig:
    # Start an exchange after this many local steps. Lower mixes faster but spends more CPU
    # on copies and network; 20 steps of the seed MLP are ~20 ms of compute.
    period_steps: int = 20
    # While training, gossip may take at most this share of wall time: after an exchange of E
    # seconds the next starts no sooner than E * (1/budget - 1) later, however short the
    # period. Bounds the overhead on slow links and big models; 0 disables the bound.
    time_budget: float = 0.1
    # Deadline for an exchange = base + bytes / min_rate. 20 MB/s is far below loopback
    # (>1 GB/s) and a LAN (>100 MB/s): only a stuck or dying peer misses it.
    deadline_base: float = 2.0
    deadline_min_rate: float = 20e6
    # After training, a peer keeps averaging every this many seconds while it lingers.
    linger_interval: float = 0.05
    # A lingering peer leaves once no peer that is still training has offered an exchange
    # for this many seconds (training peers offer every period_steps, i.e. many times a
    # second), so the last peer to finish still has partners to average with ...
    linger_quiet: float = 2.0
    # ... but never lingers longer than this.
    linger_max: float = 600.0
    # Seconds to wait for a neighbour to accept or decline an offer. A paused peer's kernel
    # still takes our bytes; this is what notices it never answers.
    accept_timeout: float = 2.0
    # Connections to neighbours kept open between exchanges (least recently used dropped).
    max_connections: int = 16
    # Neighbours tried per round before giving up until the next period.
    max_attempts: int = 3
    guard: UpdateGuard = field(default_factory=UpdateGuard)

    def deadline(self, nbytes: int) -> float:
        return self.deadline_base + 2 * nbytes / self.deadline_min_rate


@dataclass
class Outcome:
    ok: bool
    peer: str
    reason: str = ""
    seconds: float = 0.0
    busy: bool = False


class Exchanger:
    """Runs exchanges for one peer and answers the ones other peers start."""

    def __init__(self, node: Node, store: WeightStore, config: GossipConfig | None = None) -> None:
        self.node = node
        self.store = store
        self.config = config or GossipConfig()
        self.ready = True  # False while catching up: we decline offers until then
        self.exchanges = 0
        self.rejected = 0
        self.incompatible: dict[str, str] = {}  # addr or name -> why we stopped trying it
        self.step_fn: Callable[[], int] = lambda: 0  # our training progress, sent with pulls
        self.training = True  # said in our offers; lingering peers wait for those to stop
        self.last_training_offer = time.monotonic()  # when a training peer last offered
        self._busy = False
        n = store.nbytes // 4
        self._snap = np.empty(n, dtype=np.float32)  # our snapshot, reused every exchange
        self._delta = np.empty(n, dtype=np.float32)  # remote - snapshot, reused
        self._conns: OrderedDict[str, Connection] = OrderedDict()
        node.handlers[MsgType.EXCH_OFFER] = self._on_offer
        node.handlers[MsgType.PULL_REQ] = self._on_pull

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- initiator -------------------------------------------------------------------------
    async def exchange(self, addr: str) -> Outcome:
        """One push-pull with ``addr``. Never raises for network trouble: see ``Outcome``."""
        if self._busy:
            return Outcome(False, addr, "we are busy", busy=True)
        self._busy = True
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                conn = self._conns.pop(addr, None)
                if conn is not None and not conn.closed:
                    try:
                        return await self._exchange_on(conn, addr, t0)
                    except ConnectionClosed:
                        pass  # the neighbour dropped our idle connection; dial again
                conn = await self.node.open(addr)
                return await self._exchange_on(conn, addr, t0)
        except TimeoutError:
            return Outcome(False, addr, "exchange deadline passed")
        except (TransportError, OSError) as exc:
            return Outcome(False, addr, str(exc))
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("refused weights from %s: %s", addr, exc)
            return Outcome(False, addr, f"refused: {exc}")
        finally:
            self._busy = False

    async def _exchange_on(self, conn: Connection, addr: str, t0: float) -> Outcome:
        kept = False
        snap_task: asyncio.Task[float] | None = None
        try:
            await conn.send(MsgType.EXCH_OFFER, self._offer())
            # Our snapshot overlaps the round trip and the responder's own snapshot.
            snap_task = asyncio.create_task(self._take_snapshot())
            async with asyncio.timeout(self.config.accept_timeout):
                reply = await conn.recv()
            if reply.type != MsgType.EXCH_ACCEPT:
                kept = reply.type == MsgType.EXCH_DECLINE
                return self._declined(addr, reply)
            norm = await snap_task
            sent, frame = await asyncio.gather(
                conn.send(MsgType.EXCH_PAYLOAD, {}, [self._snap]),
                conn.recv(),
                return_exceptions=True,
            )
            if isinstance(frame, Frame) and frame.type == MsgType.ERROR:
                return Outcome(False, addr, str(frame.header.get("reason", "?")))
            for result in (frame, sent):
                if isinstance(result, BaseException):
                    raise result
            assert isinstance(frame, Frame)
            await self._apply(addr, norm, frame)
            kept = True
            return Outcome(True, addr, seconds=time.perf_counter() - t0)
        finally:
            if snap_task is not None and not snap_task.done():
                # The buffer is ours again only once the copy has finished.
                with contextlib.suppress(Exception):
                    await asyncio.shield(snap_task)
            if kept:
                self._keep(addr, conn)
            else:
                conn.close()

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
            "training": self.training,
        }

    def _declined(self, addr: str, reply: Frame) -> Outcome:
        reason = str(reply.header.get("reason", "?"))
        if reply.header.get("incompatible"):
            if addr not in self.incompatible:
                log.error("peer %s runs a different model: %s", addr, reason)
            self.incompatible[addr] = reason
        return Outcome(False, addr, reason, busy=bool(reply.header.get("busy")))

    async def _take_snapshot(self) -> float:
        """Copy our weights into the snapshot buffer; return its norm (checked finite)."""
        await asyncio.to_thread(self.store.snapshot_into, self._snap)
        norm = float(np.linalg.norm(self._snap))
        if not np.isfinite(norm):
            # A diverged peer must not spread NaN: it sits out until it recovers or restarts.
            raise UpdateRejected("our own weights are not finite; not exchanging")
        return norm

    async def _apply(self, addr: str, norm: float, frame: Frame) -> None:
        try:
            if frame.type != MsgType.EXCH_PAYLOAD or frame.payload.nbytes != self._snap.nbytes:
                raise UpdateRejected(f"{addr} sent a malformed payload")
            remote = np.frombuffer(frame.payload, dtype=np.float32)
            args = (remote, self._snap, norm, self._delta, self.config.guard)
            if self.store.nbytes < INLINE_MAX:
                checked_delta(*args)
                await asyncio.to_thread(self.store.add_scaled, self._delta, 0.5)
            else:
                # One hand-off for check and mix: each thread switch costs on a busy box.
                await asyncio.to_thread(self._check_and_mix, *args)
        finally:
            frame.release()
        self.exchanges += 1

    def _check_and_mix(self, *args: Any) -> None:
        self.store.add_scaled(checked_delta(*args), 0.5)

    # -- responder -------------------------------------------------------------------------
    async def _on_offer(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if h.get("schema") != self.store.schema or h.get("nbytes") != self.store.nbytes:
            await self._refuse_schema(conn, h)
            return
        if h.get("training") is True:
            self.last_training_offer = time.monotonic()
        if self._busy or not self.ready:
            await conn.send(MsgType.EXCH_DECLINE, {"busy": True, "reason": "busy"})
            return
        self._busy = True
        recv_task: asyncio.Task[Frame] | None = None
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                await conn.send(MsgType.EXCH_ACCEPT, {})
                recv_task = asyncio.create_task(conn.recv())
                try:
                    norm = await self._take_snapshot()
                except UpdateRejected as exc:
                    await conn.send(MsgType.ERROR, {"reason": str(exc)})
                    conn.close()
                    log.error("%s", exc)
                    return
                await conn.send(MsgType.EXCH_PAYLOAD, {}, [self._snap])
                payload = await recv_task
                await self._apply(conn.peer, norm, payload)
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("refused weights from %s: %s", h.get("name"), exc)
        except (TimeoutError, TransportError, OSError):
            conn.close()  # the initiator died or stalled; our weights are untouched
        finally:
            if recv_task is not None and not recv_task.done():
                recv_task.cancel()
            self._busy = False

    async def _refuse_schema(self, conn: Connection, h: dict[str, Any]) -> None:
        reason = (
            f"model schema {h.get('schema')!r} ({h.get('nbytes')} bytes) does not match ours "
            f"{self.store.schema!r} ({self.store.nbytes} bytes): "
            "run every peer with the same --model and data set"
        )
        await conn.send(MsgType.EXCH_DECLINE, {"incompatible": True, "reason": reason})
        if str(h.get("name")) not in self.incompatible:
            log.error("refused peer %s (%s): different model schema", h.get("name"), conn.peer)
            self.incompatible[str(h.get("name"))] = "schema"

    # -- catch-up ----------------------------------------------------------------------------
    async def _on_pull(self, conn: Connection, frame: Frame) -> None:
        """Send our current weights to a peer that is catching up (it does not send its own)."""
        if frame.header.get("schema") != self.store.schema:
            reason = (
                f"model schema {frame.header.get('schema')!r} does not match ours "
                f"{self.store.schema!r}: run every peer with the same --model and data set"
            )
            await conn.send(MsgType.ERROR, {"reason": reason, "incompatible": True})
            return
        weights = np.empty(self.store.nbytes // 4, dtype=np.float32)  # pulls are rare
        await asyncio.to_thread(self.store.snapshot_into, weights)
        async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
            await conn.send(
                MsgType.PULL_REPLY, {"name": self.node.name, "step": self.step_fn()}, [weights]
            )

    async def pull(self, addr: str) -> tuple[np.ndarray, int]:
        """Fetch ``addr``'s current weights and step (for a new or restarted peer)."""
        async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
            conn = await self.node.open(addr)
            try:
                await conn.send(MsgType.PULL_REQ, {"schema": self.store.schema})
                reply = await conn.recv()
            finally:
                conn.close()
        if reply.type == MsgType.ERROR and reply.header.get("incompatible"):
            raise IncompatiblePeer(f"{addr} refused us: {reply.header.get('reason', '?')}")
        if reply.type != MsgType.PULL_REPLY or reply.payload.nbytes != self.store.nbytes:
            raise TransportError(f"{addr}: bad pull reply: {reply.header.get('reason', '?')}")
        remote = np.frombuffer(reply.payload, dtype=np.float32).copy()
        reply.release()
        if not np.isfinite(remote).all():
            raise UpdateRejected(f"{addr} sent non-finite weights")
        step = reply.header.get("step")
        return remote, step if isinstance(step, int) else 0
