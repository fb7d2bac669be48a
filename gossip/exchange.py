"""The push-pull exchange between two peers.

    initiator                                  responder
    EXCH_OFFER {schema, nbytes}   ------>      busy / other schema?  -> EXCH_DECLINE {reason}
                                  <------      EXCH_ACCEPT, snapshot w_r
    snapshot w_i
    EXCH_PAYLOAD [w_i]            <----->      EXCH_PAYLOAD [w_r]      (both directions at once)
    check, mix(w_r - w_i)                      check, mix(w_i - w_r)

Both payloads are in flight at the same time, so an exchange costs about one transfer,
not two. A busy peer declines at once and the initiator tries another neighbour, so two
peers that pick each other never deadlock. Nothing here knows about torch: weights come
from a ``WeightStore``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from p2p.framing import Frame, MsgType
from p2p.node import Node
from p2p.transport import Connection, TransportError

from .averaging import UpdateGuard, UpdateRejected, check_update

log = logging.getLogger(__name__)


class WeightStore(Protocol):
    """What the exchange needs from a model: a schema, snapshots, and an in-place mix."""

    schema: str
    nbytes: int

    async def snapshot(self) -> np.ndarray:
        """A private float32 copy of the current flat weights."""
        ...

    async def mix(self, snapshot: np.ndarray, remote: np.ndarray) -> None:
        """current += (remote - snapshot) / 2, between training steps."""
        ...


class IncompatiblePeer(Exception):
    """The other peer trains a different model; averaging with it is impossible."""


@dataclass(frozen=True)
class GossipConfig:
    # Start an exchange after this many local steps. Lower mixes faster but spends more CPU
    # on copies and network; 20 steps of the seed MLP are ~20 ms of compute.
    period_steps: int = 20
    # Deadline for an exchange = base + bytes / min_rate. 20 MB/s is far below loopback
    # (>1 GB/s) and a LAN (>100 MB/s): only a stuck or dying peer misses it.
    deadline_base: float = 2.0
    deadline_min_rate: float = 20e6
    # After training, a peer keeps averaging every this many seconds while it lingers.
    linger_interval: float = 0.05
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
        self.incompatible: dict[str, str] = {}  # addr -> why we stopped trying it
        self._busy = False
        self.step_fn: Callable[[], int] = lambda: 0  # our training progress, sent with pulls
        node.handlers[MsgType.EXCH_OFFER] = self._on_offer
        node.handlers[MsgType.PULL_REQ] = self._on_pull

    # -- initiator -------------------------------------------------------------------------
    async def exchange(self, addr: str) -> Outcome:
        """One push-pull with ``addr``. Never raises for network trouble: see ``Outcome``."""
        if self._busy:
            return Outcome(False, addr, "we are busy", busy=True)
        self._busy = True
        t0 = time.perf_counter()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                conn = await self.node.open(addr)
                await conn.send(MsgType.EXCH_OFFER, self._offer())
                reply = await conn.recv()
                if reply.type != MsgType.EXCH_ACCEPT:
                    return self._declined(addr, reply)
                snap = await self.store.snapshot()
                self._check_own(snap)
                _, frame = await asyncio.gather(
                    conn.send(MsgType.EXCH_PAYLOAD, {}, [snap]), conn.recv()
                )
                await self._apply(addr, snap, frame)
                return Outcome(True, addr, seconds=time.perf_counter() - t0)
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
            if conn is not None:
                conn.close()

    def _offer(self) -> dict[str, Any]:
        return {"schema": self.store.schema, "nbytes": self.store.nbytes, "name": self.node.name}

    def _declined(self, addr: str, reply: Frame) -> Outcome:
        reason = str(reply.header.get("reason", "?"))
        if reply.header.get("incompatible"):
            if addr not in self.incompatible:
                log.error("peer %s runs a different model: %s", addr, reason)
            self.incompatible[addr] = reason
        return Outcome(False, addr, reason, busy=bool(reply.header.get("busy")))

    async def _apply(self, addr: str, snap: np.ndarray, frame: Frame) -> None:
        if frame.type != MsgType.EXCH_PAYLOAD or frame.payload.nbytes != snap.nbytes:
            raise UpdateRejected(f"{addr} sent a malformed payload")
        remote = np.frombuffer(frame.payload, dtype=np.float32)
        # The check and the mix are O(model); run the check off the event loop.
        await asyncio.to_thread(check_update, remote, snap, self.config.guard)
        await self.store.mix(snap, remote)
        self.exchanges += 1

    @staticmethod
    def _check_own(snap: np.ndarray) -> None:
        # A diverged peer must not spread NaN: it sits out until it recovers or restarts.
        if not np.isfinite(snap).all():
            raise UpdateRejected("our own weights are not finite; not exchanging")

    # -- responder -------------------------------------------------------------------------
    async def _on_offer(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if h.get("schema") != self.store.schema or h.get("nbytes") != self.store.nbytes:
            await conn.send(
                MsgType.EXCH_DECLINE,
                {
                    "incompatible": True,
                    "reason": f"model schema {h.get('schema')!r} ({h.get('nbytes')} bytes) "
                    f"does not match ours {self.store.schema!r} ({self.store.nbytes} bytes): "
                    "run every peer with the same --model and data set",
                },
            )
            if h.get("name") not in self.incompatible:
                log.error("refused peer %s (%s): different model schema", h.get("name"), conn.peer)
                self.incompatible[str(h.get("name"))] = "schema"
            return
        if self._busy or not self.ready:
            await conn.send(MsgType.EXCH_DECLINE, {"busy": True, "reason": "busy"})
            return
        self._busy = True
        try:
            async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
                snap = await self.store.snapshot()
                try:
                    self._check_own(snap)
                except UpdateRejected as exc:
                    await conn.send(MsgType.EXCH_DECLINE, {"reason": str(exc)})
                    raise
                await conn.send(MsgType.EXCH_ACCEPT, {})
                _, payload = await asyncio.gather(
                    conn.send(MsgType.EXCH_PAYLOAD, {}, [snap]), conn.recv()
                )
                await self._apply(conn.peer, snap, payload)
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("refused weights from %s: %s", h.get("name"), exc)
        except (TimeoutError, TransportError, OSError):
            pass  # the initiator died or stalled; our weights are untouched
        finally:
            self._busy = False

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
        snap = await self.store.snapshot()
        async with asyncio.timeout(self.config.deadline(self.store.nbytes)):
            await conn.send(
                MsgType.PULL_REPLY, {"name": self.node.name, "step": self.step_fn()}, [snap]
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
        remote = np.frombuffer(reply.payload, dtype=np.float32)
        if not np.isfinite(remote).all():
            raise UpdateRejected(f"{addr} sent non-finite weights")
        step = reply.header.get("step")
        return remote, step if isinstance(step, int) else 0
