"""Fuzz every wire-facing entry point in process: the frame decoder, the node's handshake and
dispatch, SWIM, the exchange handlers and a peer's status/control handlers.

    python benchmarks/fuzz.py                          # 1,000,000 frames, seed 0
    python benchmarks/fuzz.py --frames 20000 --seed 3 --json fuzz.json --trace-every 20
    python benchmarks/fuzz.py --seed 3 --replay node:1234   # one case again, with its traceback

Targets (each gets a share of the frames):

- decoder     ``Decoder`` fed a stream of frames cut at random points: ``feed``, the
              BufferedProtocol calls (with a BufferPool), or reads of exactly ``needed``
- swim        ``Swim.on_message`` and ``tick`` on a fake clock (a fresh peer every 5,000)
- membership  ``Membership.deliver`` into a running ``Membership.run()``
- node        ``Node._serve`` of a full peer stack (the Agent's SWIM handler into a running
              Membership, the Exchanger's offer and pull, a Peer's status and control over
              a fake trainer) over ``FuzzConnection``, a Connection made of the stream
- tcp         the same stack behind ``_FrameProtocol`` and ``TcpConnection``, over a fake
              asyncio transport (reads of random sizes, pause/resume, resets)
- memnet      the same stack reached over ``p2p.memnet``
- exchange    ``Exchanger._on_offer`` / ``_on_pull`` called directly (a 1 KiB store, and one
              in 40 cases a 640 KB one for DeltaStream's chunked path)
- peer        ``Peer._on_status`` / ``_on_control`` on decoded frames
- secure      ``Node._serve`` with a keyring (``p2p.secure``): the server's side of the
              handshake fed valid, mutated and random HELLO and AUTH frames, then, after a
              handshake the harness completed with the swarm's secret, sealed records valid
              and broken (bit and tag flips, truncated, replayed, reordered, sealed ahead or
              with another key, frames in the clear, lying prefixes, oversize) carrying
              frames valid and broken, over ``LiveConnection`` (a caller that answers)

Inputs come from a plain seeded mutator (no coverage feedback, for speed): valid frames of
every message type, the same with fields of the wrong type (None, bools, out-of-range
ints, NaN, huge and empty strings, lists, maps, values nested ~1000 deep, long lists),
``_seg`` lists that lie, rewritten prefixes (magic, type, flags, header and payload lengths
up to 2**64 - 1), byte-level mutations (bit flips, byte sets, inserts, deletes, duplicated
stretches), truncations, msgpack garbage as a header (random bytes, non-maps, integer keys,
bin and ext values, 1024-deep nesting, trailing bytes, containers that claim 4 G
elements), random bytes, and streams of several frames cut, spliced or left silent.
SWIM messages come from a pool of 24 members and, one in ten, a new name and address.
Every case is generated from ``(seed, target, index)`` alone, so ``--replay`` rebuilds it.

What counts (the exit status is non-zero on any of them):

- crash: an exception escaping where the code promises none (``Decoder``: only
  ``FrameError``; ``Swim.on_message``, ``Membership``: nothing; a connection handler: only
  what ``TcpTransport._serve`` treats as a closed connection, ``TimeoutError``,
  ``TransportError``, ``OSError``); a broken invariant (a lock left held, a busy flag left
  set, non-finite weights applied, a decoder that asks for 0 bytes or holds more than the
  limits; with a keyring: a frame handled from a record that failed authentication or
  after it, such a record leaving the connection open, a refused caller told anything but
  "authentication failed", a sealed reply the caller cannot open); a reply that a peer
  with the same ``Limits`` could not decode; a log record that cannot be formatted;
  per-address, per-name or per-size state growing past a bound;
- hang: a case still running after ``--case-timeout`` seconds (every await of a case runs
  under that deadline; a busy loop is caught by a CPU-time watchdog, SIGVTALRM);
- memory: a case whose allocation peak (tracemalloc) exceeds what its input can justify
  (``HEADER_AMPLIFICATION`` x its bytes, plus one payload of ``max_payload``, plus
  ``CASE_SLACK``: a frame that declares 2 GiB must not allocate it), or a target whose
  retained memory grows by more than ``LEAK_BOUND`` over its run.

Adding a target is a few lines: a class with ``gen`` (``Fuzzer.stream`` gives framed byte
streams, ``Fuzzer.swim_message`` SWIM messages, ``Fuzzer.nasty`` hostile values) and ``run``
taking one input (plain or async; ``FuzzConnection(data, rng)`` turns bytes into a
Connection, ``LiveConnection`` is one the case keeps writing to as the server answers),
then one entry in ``make_targets`` and ``TARGET_NAMES``::

    def secure() -> Target:
        s = SecureTarget(seed)
        return Target("secure", s.gen, s.run, (AuthError, *SERVE_ERRORS), s.check, weight=0.08)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import inspect
import logging
import math
import os
import random
import re
import reprlib
import resource
import signal
import struct
import sys
import time
import traceback
import tracemalloc
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gossip.agent import Agent, AgentConfig  # noqa: E402
from gossip.events import Events  # noqa: E402
from gossip.exchange import Exchanger, GossipConfig, IncompatiblePeer, Outcome  # noqa: E402
from gossip.store import ArrayStore  # noqa: E402
from p2p.framing import (  # noqa: E402
    MAGIC,
    PREFIX,
    BufferPool,
    Decoder,
    Frame,
    FrameError,
    Limits,
    MsgType,
    encode,
    encode_bytes,
)
from p2p.membership import Membership  # noqa: E402
from p2p.memnet import MemoryConnection, MemoryNetwork, MemoryTransport  # noqa: E402
from p2p.node import Node, NodeConfig  # noqa: E402
from p2p.secure import (  # noqa: E402
    AUTH_FAILED,
    RECORD,
    TAG,
    AuthError,
    ClientState,
    Keyring,
    SealedConnection,
    _public,
    client_verify,
    key_id,
    member_tag,
)
from p2p.swim import MAX_NAME, MAX_RELAYS, State, Swim, SwimConfig  # noqa: E402
from p2p.transport import (  # noqa: E402
    Connection,
    ConnectionClosed,
    Stats,
    TcpConnection,
    Transport,
    TransportError,
    _FrameProtocol,
)

# The limits every decoder of the harness runs with: the default header limit (SWIM's full
# state and a peer's status must fit it) and a small payload limit, so that a declared
# length beyond it is cheap to notice when it is allocated anyway.
LIMITS = Limits(max_header=1 << 20, max_payload=1 << 20, max_segments=4096)
# Most Python-object bytes one msgpack header byte may become (measured: a list of empty
# maps decodes to ~73 bytes of objects per byte). Limits bounds header bytes, not objects.
HEADER_AMPLIFICATION = 80
CASE_SLACK = 8 << 20  # a case's own bookkeeping: replies, SWIM state, asyncio handles
LEAK_BOUND = 16 << 20  # retained growth allowed over a whole target's run ...
WARM_UP = 50  # ... counted from this case on
LEAK_BLOCKS = 200_000  # without tracemalloc throughout: Python memory blocks retained
CLUSTER = "fuzz-cluster"
NODE_NAME = "fuzz-node"
SCHEMA = "fuzz-schema-0001"
WEIGHTS = 256  # float32 values of the exchange stores: 1 KiB payloads
BIG_WEIGHTS = 160_000  # one store over DeltaStream's 512 KiB chunk: the streamed delta path
# Handler deadlines of the harness's node and exchanger: a silent remote ends a case fast.
FAST_NODE = NodeConfig(cluster=CLUSTER, handshake_timeout=0.05, idle_timeout=0.05)
FAST_GOSSIP = GossipConfig(deadline_base=0.05, accept_timeout=0.05)
SERVE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, TransportError, OSError)
# What a caller of Node.open and Exchanger.pull handles (the agent's catch-up: ValueError
# covers UpdateRejected); Exchanger.exchange promises to raise nothing.
CLIENT_ERRORS = (*SERVE_ERRORS, ValueError, IncompatiblePeer)

_short = reprlib.Repr()
_short.maxstring = 120
_short.maxother = 120
_short.maxlevel = 4


def short(value: Any) -> str:
    return _short.repr(value)


class Hang(BaseException):
    """Raised by the CPU-time watchdog inside a case that never yields."""


class Violation(AssertionError):
    """An invariant of the code under test does not hold after a case."""


# -- inputs ---------------------------------------------------------------------------------


def _deep(depth: int, leaf: Any = None) -> Any:
    value: Any = {} if leaf is None else leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


class Fuzzer:
    """Generates inputs from one ``random.Random``; every method is deterministic in it."""

    NAMES = [f"p{i}" for i in range(24)]
    ADDRS = [f"10.0.0.{i}:7000" for i in range(24)]

    def __init__(self, rng: random.Random, limits: Limits = LIMITS) -> None:
        self.rng = rng
        self.limits = limits
        self.frames = 0  # frames (or messages) generated so far

    # -- values -------------------------------------------------------------------------
    def nasty(self, depth: int = 0) -> Any:
        """A msgpack value chosen to break code that trusts a field's type or size."""
        r = self.rng
        k = r.randrange(36 if depth < 2 else 27)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k == 2:
            return r.choice([0, 1, -1, 2, 255, 256, 65535, 2**31, 2**32])
        if k == 3:
            return r.choice([2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31)])
        if k == 4:
            return r.randint(-(2**63), 2**64 - 1)
        if k == 5:
            return r.choice([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 0.5])
        if k == 6:
            return r.uniform(-1e6, 1e6)
        if k == 7:
            return ""
        if k == 8:
            return "x" * r.choice([1, MAX_NAME, MAX_NAME + 1, 1000, 65, 64])
        if k == 9:
            return "".join(chr(r.randrange(0x20, 0x2FFF)) for _ in range(r.randrange(1, 12)))
        if k == 10:
            return r.choice(["\x00", "\n", "%s%d", "{}", "'\"", "\ufffd", "\u202e"])
        if k == 11:
            return r.choice(self.NAMES + [NODE_NAME, CLUSTER, SCHEMA, "slowdown"])
        if k == 12:
            return r.choice(self.ADDRS + ["mem:1", ":", "host:", ":1", "h:99999", "[::1]:1"])
        if k in (13, 14):
            return r.choice(["alive", "suspect", "dead", "left", "ping", "ack", "gossip"])
        if k == 15:
            return []
        if k == 16:
            return {}
        if k == 17:
            return [r.randrange(256) for _ in range(r.randrange(1, 6))]
        if k == 18:
            return [1]
        if k == 19:
            return r.choice([[1, 2], [0], [2**64 - 1], [-1], [1.0], ["1"], [True]])
        if k == 20:
            return {"kind": "alive", "name": "p1", "addr": "10.0.0.1:7000", "inc": 1}
        if k in (21, 22, 23, 24, 25, 26):
            return r.choice([1, 0, "", None, "p0", True, 3.5, -5])
        if k in (27, 28):
            return [self.nasty(depth + 1) for _ in range(r.randrange(1, 5))]
        if k in (29, 30):
            return {self.key(): self.nasty(depth + 1) for _ in range(r.randrange(1, 5))}
        if k in (31, 34, 35):
            return _deep(r.choice([2, 50, 400, 990, 1010]))  # repr gives up near 1000
        if k == 32:
            return [r.randrange(100) for _ in range(r.choice([17, 300, 3000]))]
        return "y" * r.choice([10_000, 70_000])  # k == 33

    def key(self) -> str:
        return self.rng.choice(
            [
                "type",
                "from",
                "addr",
                "inc",
                "seq",
                "_seg",
                "schema",
                "nbytes",
                "name",
                "op",
                "k",
                "",
            ]
        )

    def maybe_wrong(self, header: dict[str, Any], p: float = 0.3) -> dict[str, Any]:
        """With probability ``p``: 1-3 fields replaced, removed or added, with nasty values."""
        r = self.rng
        if r.random() >= p:
            return header
        header = dict(header)
        for _ in range(r.randint(1, 3)):
            op = r.random()
            keys = [k for k in header if k != "_seg"]
            if op < 0.6 and keys:
                header[r.choice(keys)] = self.nasty()
            elif op < 0.8 and keys:
                del header[r.choice(keys)]
            else:
                header[self.key() if r.random() < 0.5 else "extra"] = self.nasty()
        return header

    # -- SWIM ---------------------------------------------------------------------------
    def member(self) -> tuple[str, str]:
        """A (name, address): mostly one of 24 (so that state builds up), now and then a
        new one (churn, or a stranger inventing peers: what it makes us keep must be bounded)."""
        r = self.rng
        if r.random() < 0.1:
            n = r.getrandbits(40)
            return f"n{n:x}", f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}:{n >> 24 & 0xFFFF}"
        i = r.randrange(len(self.NAMES))
        return self.NAMES[i], self.ADDRS[i]

    def _update(self, me: str) -> dict[str, Any]:
        r = self.rng
        name, addr = self.member()
        if r.random() < 0.08:
            name = me
        kind = r.choice(["alive", "alive", "suspect", "dead", "left"])
        u: dict[str, Any] = {"kind": kind, "name": name, "inc": r.randrange(6)}
        if kind == "alive":
            u["addr"] = addr
            if r.random() < 0.2:
                u["meta"] = r.choice(["training", "finished", ""])
        elif kind != "left":
            u["by"] = r.choice(self.NAMES)
        return self.maybe_wrong(u, 0.1)

    def swim_message(self, me: str = NODE_NAME, me_addr: str = "mem:1") -> dict[str, Any]:
        """A SWIM message about a pool of 24 names; often valid, so that state builds up."""
        r = self.rng
        self.frames += 1
        sender, sender_addr = self.member()
        kind = r.choice(
            ["ping", "ping", "ack", "ping_req", "nack", "gossip", "gossip", "push_pull"]
        )
        msg: dict[str, Any] = {"type": kind, "from": sender, "addr": sender_addr}
        if r.random() < 0.8:
            msg["inc"] = r.randrange(8)
        if r.random() < 0.1:
            msg["meta"] = r.choice(["training", "finished"])
        seq = r.randrange(40)
        if kind in ("ping", "ack", "ping_req", "nack"):
            msg["seq"] = seq
        if kind == "ping":
            msg["target"] = me if r.random() < 0.9 else r.choice(self.NAMES)
        if kind == "ping_req":
            target, target_addr = self.member()
            msg.update(target=target, target_addr=target_addr, nack=r.random() < 0.5)
        if kind in ("ping", "ack", "gossip"):
            n = r.choice([0, 1, 2, 4, 16]) if r.random() < 0.97 else r.choice([17, 200, 5000])
            msg["updates"] = [self._update(me) for _ in range(min(n, 20))] * max(1, n // 20)
        if kind == "push_pull":
            n = r.randrange(12) if r.random() < 0.995 else r.choice([2048, 2049, 4000])
            members: list[Any] = []
            for j in range(n):
                name = self.NAMES[j % len(self.NAMES)] if n < 100 else f"m{j}"
                entry: list[Any] = [name, self.ADDRS[j % len(self.ADDRS)] if n < 100 else f"h{j}:1"]
                entry += [r.randrange(6), r.randrange(4)]
                if r.random() < 0.2:
                    entry.append("finished")
                members.append(entry)
            if r.random() < 0.1 and members:
                members[r.randrange(len(members))] = self.nasty()
            msg.update(members=members, reply=r.random() < 0.5, join=r.random() < 0.3)
        roll = r.random()
        if roll < 0.05:
            msg["from"], msg["addr"] = me, me_addr  # our own name or address
        elif roll < 0.08:
            msg["type"] = r.choice(["pong", "", "PING", None, 4])
        if r.random() < 0.03:
            msg = self.nasty() if r.random() < 0.5 else {self.key(): self.nasty()}
        return self.maybe_wrong(msg, 0.25) if isinstance(msg, dict) else msg

    # -- frames -------------------------------------------------------------------------
    def payload(self, nbytes: int, near: np.ndarray | None = None) -> bytes:
        """Weights to send: close to ``near`` (accepted), or NaN, inf, huge, or random."""
        r = self.rng
        k = r.random()
        n = nbytes // 4
        if near is not None and near.size == n and k < 0.6:
            noise = np.frombuffer(r.randbytes(n), dtype=np.int8).astype(np.float32)
            arr = near + noise * np.float32(1e-3)
            if k < 0.15:
                arr[r.randrange(n)] = r.choice([math.nan, math.inf, -math.inf, 3e38])
            elif k < 0.25:
                arr *= np.float32(r.choice([1e4, -1.0, 0.0]))
            return arr.tobytes()
        return r.randbytes(nbytes)

    def header_for(self, t: int, ctx: Context) -> tuple[dict[str, Any], list[bytes]]:
        r = self.rng
        name = r.choice(self.NAMES)
        if t == MsgType.HELLO:
            versions = [1] if r.random() < 0.8 else r.choice([[1, 2], [0, 1], [2], []])
            h: dict[str, Any] = {"versions": versions, "cluster": CLUSTER, "name": name}
            h["addr"] = r.choice(self.ADDRS)
            if r.random() < 0.05:
                h["cluster"] = "other"
            return h, []
        if t == MsgType.HELLO_OK:
            return {"version": 1, "name": name, "addr": r.choice(self.ADDRS)}, []
        if t in (MsgType.ERROR, MsgType.EXCH_DECLINE):
            return {"reason": "no", "busy": r.random() < 0.5, "incompatible": r.random() < 0.5}, []
        if t == MsgType.SWIM:
            msg = self.swim_message()
            self.frames -= 1  # counted as this frame
            return (msg if isinstance(msg, dict) else {"v": msg}), []
        if t == MsgType.EXCH_OFFER:
            schema = SCHEMA if r.random() < 0.85 else r.choice(["other", SCHEMA + "x"])
            nbytes = ctx.nbytes if r.random() < 0.9 else r.choice([0, 4, ctx.nbytes + 4])
            return {"schema": schema, "nbytes": nbytes, "name": name, "training": True}, []
        if t in (MsgType.EXCH_PAYLOAD, MsgType.PULL_REPLY):
            k = r.random()
            size = ctx.nbytes if k < 0.85 else r.choice([0, 4, ctx.nbytes - 4, 4097])
            if k > 0.95:  # a size of its own: whatever keeps buffers by size must stay bounded
                size = r.randrange(512, 1 << 16)
            h = {"name": name, "step": r.randrange(100)} if t == MsgType.PULL_REPLY else {}
            segs = [self.payload(size, ctx.weights)]
            if r.random() < 0.05 and size >= 8:  # the same bytes as two segments
                segs = [segs[0][:4], segs[0][4:]]
            return h, segs
        if t == MsgType.PULL_REQ:
            h = {"schema": SCHEMA if r.random() < 0.5 else "other"}
            if r.random() < 0.5:
                good = [["w", [WEIGHTS], "torch.float32"]]
                h["layout"] = good if r.random() < 0.3 else [[self.nasty(), self.nasty(), "f"]]
            return h, []
        if t == MsgType.STATUS:
            return {"name": name, "status": "training", "step": 1, "members": []}, []
        if t == MsgType.CONTROL:
            factor = r.choice([1, 2, 4.0, 1000, 0, 1001, -1, 0.5, math.nan, math.inf, True])
            return {"op": "slowdown" if r.random() < 0.9 else "speedup", "factor": factor}, []
        if t == MsgType.CONTROL_OK:
            return {"op": "slowdown", "factor": 2}, []
        return {}, []  # EXCH_ACCEPT, STATUS_REQ, unknown types

    def frame_bytes(self, t: int, ctx: Context, clean: float = 0.35) -> bytes:
        """One frame of type ``t``, valid with probability ``clean``, else broken one way."""
        r = self.rng
        self.frames += 1
        header, segs = self.header_for(t, ctx)
        k = r.random()
        if k < clean:
            return self._encode(t, header, segs)
        k = r.random()
        if k < 0.30:  # valid-looking frame of this type with fields of the wrong type
            return self._encode(t, self.maybe_wrong(header, 1.0), segs)
        if k < 0.40:
            return self._seg_lie(t, header, segs)
        if k < 0.52:
            return self._prefix_lie(self._encode(t, header, segs))
        if k < 0.70:
            return self._mutate_bytes(self._encode(t, header, segs))
        if k < 0.77:
            data = self._encode(t, header, segs)
            return data[: r.randrange(len(data))]
        if k < 0.87:
            return self._garbage_header(t)
        if k < 0.95:
            return self._huge(t)
        if k < 0.98:
            return self._encode(r.choice([0, 15, 99, 255]), self.maybe_wrong(header, 0.5), segs)
        return r.randbytes(r.choice([1, 15, 16, 17, 100, 5000]))

    def _encode(self, t: int, header: dict[str, Any], segs: Sequence[bytes]) -> bytes:
        try:
            return encode_bytes(t, header, segs)
        except (TypeError, ValueError, OverflowError):  # not packable (should not happen)
            return encode_bytes(t, {}, segs)

    @staticmethod
    def _raw(t: int, head: bytes, payload: bytes, plen: int | None = None, flags: int = 0) -> bytes:
        n = len(payload) if plen is None else plen
        return PREFIX.pack(MAGIC, t & 0xFF, flags, len(head), n) + head + payload

    def _seg_lie(self, t: int, header: dict[str, Any], segs: Sequence[bytes]) -> bytes:
        r = self.rng
        payload = b"".join(segs)
        n = len(payload)
        lie = r.choice(
            [
                [n + 1],
                [n - 1] if n else [1],
                [-1, n + 1],
                [n, 0, 0],
                [str(n)],
                [float(n)],
                n,
                None,
                {"n": n},
                [1] * 4097,
                [2**64 - 1],
                [0] * (n + 1),
                [n // 2, n - n // 2 + 1],
                [True] * n if n < 5000 else [n],
                [],
            ]
        )
        head = msgpack.packb({**header, "_seg": lie}, use_bin_type=True)
        return self._raw(t, head, payload)

    def _prefix_lie(self, data: bytes) -> bytes:
        r = self.rng
        magic, t, flags, hlen, plen = PREFIX.unpack_from(data)
        field_ = r.randrange(6)
        if field_ == 0:
            magic = r.choice([b"GU", b"\x00\x00", b"tg", b"HT"])
        elif field_ == 1:
            t = r.randrange(256)
        elif field_ == 2:
            flags = r.randrange(1, 256)
        elif field_ == 3:
            top = self.limits.max_header
            hlen = r.choice([0, 1, hlen - 1, hlen + 1, hlen * 2, top, top + 1, 2**32 - 1])
        elif field_ == 4:
            plen = r.choice([0, plen + 1, max(0, plen - 1), self.limits.max_payload,
                             self.limits.max_payload + 1, 2 << 30, 2**64 - 1,
                             r.randrange(2**64)])  # fmt: skip
        else:
            hlen, plen = plen & 0xFFFFFFFF, hlen
        hlen &= 0xFFFFFFFF
        return PREFIX.pack(magic, t, flags, hlen, plen) + data[PREFIX.size :]

    def _mutate_bytes(self, data: bytes) -> bytes:
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.choice([1, 1, 2, 3, 8])):
            if not buf:
                break
            op = r.randrange(6)
            i = r.randrange(len(buf))
            if op == 0:
                buf[i] ^= 1 << r.randrange(8)
            elif op == 1:
                buf[i] = r.choice([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDE, 0xC4, 0xD4])
            elif op == 2:
                buf[i:i] = r.randbytes(r.randrange(1, 9))
            elif op == 3:
                del buf[i : i + r.randrange(1, 9)]
            elif op == 4:
                j = r.randrange(i, min(len(buf), i + 64) + 1)
                buf[j:j] = buf[i:j]
            else:
                i = r.randrange(min(len(buf), PREFIX.size + 8))  # the prefix and header start
                buf[i] = r.randrange(256)
        return bytes(buf)

    def _garbage_header(self, t: int) -> bytes:
        r = self.rng
        k = r.randrange(11)
        if k == 0:
            head = r.randbytes(r.randrange(1, 200))
        elif k == 1:
            head = msgpack.packb(self.nasty())  # maybe not a map
        elif k == 2:
            head = msgpack.packb({1: "int key", "a": 1}, strict_types=False)
        elif k == 3:
            head = msgpack.packb({"a": b"bin"}, use_bin_type=True)
        elif k == 4:
            head = msgpack.packb({"a": msgpack.ExtType(5, b"ext")})
        elif k == 5:
            head = b"\x81\xa1a" + b"\x91" * r.choice([900, 1000, 1023, 1024, 5000]) + b"\x80"
        elif k == 6:
            head = msgpack.packb({"a": 1}) + r.randbytes(r.randrange(1, 5))  # trailing data
        elif k == 7:
            head = msgpack.packb({"a": 1})[:-1]  # cut short
        elif k == 8:
            n = r.choice([1000, 60_000])  # many small objects: header amplification
            head = b"\x81\xa1a\xdd" + n.to_bytes(4, "big") + b"\x80" * n
        elif k == 9:
            head = b"\x81\xa1a\xdd\xff\xff\xff\xff"  # a list that claims 4 G elements
        else:
            head = b"\x81\xa1a\xdb\x7f\xff\xff\xff" + b"s" * 10  # a string that claims 2 GB
        payload = r.randbytes(r.choice([0, 0, 4, 100]))
        return self._raw(t, head, payload)

    def _huge(self, t: int) -> bytes:
        """A prefix that declares large lengths, followed by few of the bytes it promises."""
        r = self.rng
        lim = self.limits
        plen = r.choice(
            [lim.max_payload, lim.max_payload + 1, 2 << 30, 2**32, 2**63, 2**64 - 1, 1 << 40]
        )
        head = msgpack.packb({"_seg": [plen]} if r.random() < 0.7 else {"_seg": [1, plen - 1]})
        hlen = len(head)
        if r.random() < 0.3:
            hlen = r.choice([lim.max_header, lim.max_header + 1, 2**32 - 1, 2**31])
        tail = r.randbytes(r.choice([0, 1, 100, 70_000]))
        return PREFIX.pack(MAGIC, t & 0xFF, 0, hlen, plen) + head + tail

    TYPES = tuple(int(t) for t in MsgType)

    def any_type(self) -> int:
        r = self.rng
        return r.choice(self.TYPES) if r.random() < 0.97 else r.randrange(256)

    def stream(self, ctx: Context, script: Sequence[int] = (), extra: int = 3) -> bytes:
        """Frames back to back: ``script``'s types first (each often valid), then up to
        ``extra`` frames of any type; sometimes the stream itself is cut or spliced."""
        r = self.rng
        parts = [self.frame_bytes(t, ctx, clean=0.7) for t in script]
        parts += [self.frame_bytes(self.any_type(), ctx) for _ in range(r.randrange(extra + 1))]
        if not parts:
            parts.append(self.frame_bytes(self.any_type(), ctx))
        data = b"".join(parts)
        k = r.random()
        if k < 0.05 and data:
            data = data[: r.randrange(len(data))]
        elif k < 0.08:
            data += r.randbytes(r.randrange(1, 64))
        elif k < 0.10 and len(parts) > 1:
            i = r.randrange(len(data))
            data = data[:i] + data[r.randrange(len(data)) :]
        return data


@dataclass
class Context:
    """What a valid frame must say to get past the first checks (the store's size, ...)."""

    nbytes: int
    weights: np.ndarray | None


# -- a Connection over a byte stream --------------------------------------------------------


class FuzzConnection(Connection):
    """The remote side is a byte stream: decoded like ``TcpConnection`` does (the
    BufferedProtocol path, reads of random sizes, partial payloads reported to
    ``watch_payload``), a ``FrameError`` closes it, and the end of the stream is the peer
    closing (or, with ``stall``, going silent: only the code's own deadlines end the wait).
    Whatever the code sends is encoded and checked against ``limits``."""

    def __init__(
        self,
        data: bytes,
        rng: random.Random,
        limits: Limits = LIMITS,
        pool: BufferPool | None = None,
        *,
        stall: bool = False,
        fail_send_at: int = 0,
    ) -> None:
        self.peer = "10.0.0.200:7000"
        self._data = memoryview(data)
        self._pos = 0
        self._rng = rng
        self._decoder = Decoder(limits, pool)
        self._frames: deque[Frame] = deque()
        self._error: FrameError | None = None
        self._closed = False
        self.stall = stall
        self.fail_send_at = fail_send_at
        self.limits = limits
        self.sent: list[int] = []
        self.bad_replies: list[str] = []

    def _read_some(self) -> None:
        buf = self._decoder.get_buffer()
        left = len(self._data) - self._pos
        n = min(len(buf), left, self._rng.choice([1, 7, 16, 100, 4096, 1 << 20]))
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        try:
            self._decoder.buffer_updated(n)
        except FrameError as exc:
            self._error = exc
        self._frames.extend(self._decoder.frames)
        self._decoder.frames.clear()

    async def recv(self) -> Frame:
        while not self._frames:
            if self._error is not None:
                raise ConnectionClosed(str(self._error))
            if self._closed:
                raise ConnectionClosed("connection closed")
            if self._pos >= len(self._data):
                if self.stall:
                    await asyncio.Event().wait()  # silent peer: only a deadline ends this
                raise ConnectionClosed("connection closed by peer")
            self._read_some()
        if self._rng.random() < 0.1:
            await asyncio.sleep(0)
        return self._frames.popleft()

    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None:
        if self._closed:
            raise ConnectionClosed("connection closed")
        parts = encode(msg_type, header, segments)  # raises as TcpConnection.send would
        _, _, _, hlen, plen = PREFIX.unpack_from(parts[0])
        if hlen > self.limits.max_header or plen > self.limits.max_payload:
            self.bad_replies.append(f"type {msg_type}: {hlen}-byte header, {plen}-byte payload")
        self.sent.append(msg_type)
        if self.fail_send_at and len(self.sent) >= self.fail_send_at:
            self._closed = True
            raise ConnectionClosed("connection reset by peer")
        if self._rng.random() < 0.1:
            await asyncio.sleep(0)

    def watch_payload(self, fn: Callable[[int, memoryview, int], None] | None) -> None:
        self._decoder.progress = fn
        self._decoder.report_progress()

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed or self._error is not None


# -- targets --------------------------------------------------------------------------------


@dataclass
class Target:
    """One entry point. ``gen`` makes an input from a Fuzzer; ``run`` takes it (plain or
    async); ``allowed`` are the exceptions ``run`` may raise; ``check`` asserts invariants
    after a case (raise ``Violation``); ``setup``/``teardown`` bracket the target's run."""

    name: str
    gen: Callable[[Fuzzer], Any]
    run: Callable[[Any], Awaitable[None] | None]
    allowed: tuple[type[BaseException], ...] = ()
    check: Callable[[], None] | None = None
    setup: Callable[[], Awaitable[None]] | None = None
    teardown: Callable[[], Awaitable[None]] | None = None
    weight: float = 1.0


class DecoderTarget:
    """The sans-IO decoder: a stream fed in random pieces, through ``feed``, the
    BufferedProtocol calls, or a reader that asks for exactly ``needed`` bytes."""

    def __init__(self) -> None:
        self.ctx = Context(WEIGHTS * 4, None)
        self.pool = BufferPool(min_size=512)
        self.frames_out = 0

    def gen(self, fz: Fuzzer) -> tuple[bytes, int]:
        return fz.stream(self.ctx, extra=4), fz.rng.randrange(3)

    def run(self, case: tuple[bytes, int]) -> None:
        data, mode = case
        rng = random.Random(len(data) * 31 + mode)
        dec = Decoder(LIMITS, self.pool if mode == 1 else None)
        view = memoryview(data)
        pos = 0
        frames: list[Frame] = []
        try:
            while pos < len(view):
                need = dec.needed
                if need < 1:
                    raise Violation(f"Decoder.needed is {need} mid-stream")
                if mode == 0:
                    n = rng.choice([1, 3, 16, 17, 1000, 1 << 16, len(view)])
                    frames += dec.feed(view[pos : pos + n])
                elif mode == 1:
                    buf = dec.get_buffer()
                    n = min(len(buf), len(view) - pos, rng.choice([1, 5, 100, 1 << 20]))
                    buf[:n] = view[pos : pos + n]
                    dec.buffer_updated(n)
                    frames += dec.frames
                    dec.frames.clear()
                else:
                    n = min(need, len(view) - pos)  # never reads past the part being read
                    frames += dec.feed(view[pos : pos + n])
                pos += n
                self._check_state(dec)
        finally:
            for f in frames:
                self._check_frame(f)
                f.release()
            self.frames_out += len(frames)
            _check_pool(self)

    @staticmethod
    def _check_state(dec: Decoder) -> None:
        p = dec._payload
        if p is not None and p.nbytes > LIMITS.max_payload:
            raise Violation(f"decoder holds a {p.nbytes}-byte payload buffer")
        if len(dec._head) > LIMITS.max_header:
            raise Violation(f"decoder buffered a {len(dec._head)}-byte header")

    @staticmethod
    def _check_frame(f: Frame) -> None:
        if not isinstance(f.header, dict) or not 0 <= f.type <= 255:
            raise Violation(f"decoded a frame with header {short(f.header)}, type {f.type}")
        seg = f.header.get("_seg", [])
        if sum(seg) != f.payload.nbytes or f.payload.nbytes > LIMITS.max_payload:
            raise Violation(f"frame payload {f.payload.nbytes} B vs _seg {short(seg)}")
        if sum(s.nbytes for s in f.segments) != f.payload.nbytes:
            raise Violation("segments do not cover the payload")


class SwimTarget:
    """``Swim.on_message`` (never raises) and ``tick``, on a fake clock."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cases = 0
        self.now = 0.0
        self.swim = self._new()

    def _new(self) -> Swim:
        rng = random.Random(self.seed + self.cases)
        swim = Swim(NODE_NAME, "mem:1", SwimConfig.local(), rng, self.now)
        if rng.random() < 0.5:
            swim.join(Fuzzer.ADDRS[:3], self.now)
        return swim

    def gen(self, fz: Fuzzer) -> tuple[dict[str, Any] | Any, float]:
        return fz.swim_message(), fz.rng.expovariate(20.0)

    def run(self, case: tuple[Any, float]) -> None:
        msg, dt = case
        self.cases += 1
        if self.cases % 5_000 == 0:
            self.swim = self._new()  # a fresh peer now and then: join, early state
        s = self.swim
        outs = s.on_message(msg, self.now)
        self.now += dt
        if self.cases % 4 == 0:
            outs += s.tick(self.now)
        s.drain_events()  # what the driver does
        for addr, out in outs:
            if not isinstance(addr, str) or not isinstance(out, dict):
                raise Violation(f"Swim returned {short((addr, out))}")
            if self.cases % 16 == 0:
                size = len(msgpack.packb(out, use_bin_type=True))
                if size > LIMITS.max_header:
                    raise Violation(f"Swim sends a {size}-byte {out.get('type')} message")

    def check(self) -> None:
        s = self.swim
        if self.cases % 50:
            return  # O(members): not after every message
        if len(s._members) > s.config.max_members or len(s._relays) > MAX_RELAYS:
            raise Violation(f"{len(s._members)} members, {len(s._relays)} relays held")
        live = sum(1 for m in s._members.values() if m.state in (State.ALIVE, State.SUSPECT))
        if live != s.num_live():
            raise Violation(f"live count {s.num_live()} but {live} live members")
        for m in s._members.values():
            if not (isinstance(m.name, str) and 0 < len(m.name) <= MAX_NAME):
                raise Violation(f"member name {short(m.name)}")


class MembershipTarget:
    """The asyncio path: ``Membership.deliver`` from a handler, ``run()`` processing it."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.task: asyncio.Task[None] | None = None
        self.sent = 0
        self.bad: list[str] = []

    async def setup(self) -> None:
        swim = Swim("fuzz-m", "mem:2", SwimConfig.local(), self.rng, time.monotonic())
        self.membership = Membership(swim, self._send)
        self.task = asyncio.get_running_loop().create_task(self.membership.run())
        await asyncio.sleep(0)

    def _restart(self) -> None:
        """A dead driver fails every later case too: count it once, start a new one."""
        swim = Swim("fuzz-m", "mem:2", SwimConfig.local(), self.rng, time.monotonic())
        self.membership = Membership(swim, self._send)
        self.task = asyncio.get_running_loop().create_task(self.membership.run())

    async def _send(self, addr: str, msg: dict[str, Any]) -> None:
        self.sent += 1
        if self.sent % 8 == 0:
            size = len(msgpack.packb(msg, use_bin_type=True))
            if size > LIMITS.max_header:
                self.bad.append(f"{msg.get('type')} of {size} bytes")
        if self.sent % 5 == 0:
            raise TransportError("connect: Connection refused")

    def gen(self, fz: Fuzzer) -> list[Any]:
        return [fz.swim_message("fuzz-m", "mem:2") for _ in range(fz.rng.randint(1, 6))]

    async def run(self, msgs: list[Any]) -> None:
        for msg in msgs:
            self.membership.deliver(msg)
        for _ in range(50):
            await asyncio.sleep(0)
            if not self.membership._inbox:
                break
        self.check()

    def check(self) -> None:
        assert self.task is not None
        if self.task.done():
            _driver_died(self.task, self._restart)
        if self.bad:
            bad, self.bad = self.bad, []
            raise Violation(f"membership sent messages over the header limit: {bad[:3]}")

    async def teardown(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


# What a peer may keep per remote address, name or size, whatever strangers send it.
STATE_BOUND = 4096


def _bounded(what: str, n: int, bound: int = STATE_BOUND) -> None:
    if n > bound:
        raise Violation(f"{what} holds {n} entries (bound {bound}): grows with remote input")


def _pool_bytes(pool: BufferPool) -> int:
    return sum(len(free) * size for size, free in pool._free.items())


# A pool keeps buffers of the few sizes in use: at most this much, whatever sizes arrive.
POOL_BOUND = 4 * (64 << 20)


def _check_pool(owner: Any) -> None:
    """``owner.pool`` keeps few sizes; once it does not, it is replaced (reported once)."""
    pool = owner.pool
    held = _pool_bytes(pool)
    if held > POOL_BOUND or len(pool._free) > 64:
        owner.pool = BufferPool(min_size=pool.min_size)
        raise Violation(f"BufferPool keeps {held} bytes in {len(pool._free)} sizes")


def _driver_died(task: asyncio.Task[None], restart: Callable[[], None]) -> None:
    exc = None if task.cancelled() else task.exception()
    restart()
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # the TaskGroup's first error says where
    err = Violation(f"Membership.run() ended: {type(exc).__name__}: {exc}")
    if exc is not None:
        raise err.with_traceback(exc.__traceback__)
    raise err


class LayoutStore(ArrayStore):
    """An ArrayStore with a layout, like ``trainer.weights.FlatWeights``."""

    def __init__(self, weights: np.ndarray, schema: str) -> None:
        super().__init__(weights, schema)
        self.layout = [["w", [weights.size], "torch.float32"]]


class FakeTrainer:
    """What ``Peer.status_dict`` and ``Peer._on_control`` read of a trainer."""

    step = 3
    total_steps = 100
    loss = 0.25
    slowdown = 0.0
    samples = 96


class StackTarget:
    """One node as a peer runs it: the handshake, then every handler (SWIM into a running
    Membership, exchange offer and pull, a Peer's status and control) over one stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.initial = rng.standard_normal(WEIGHTS).astype(np.float32)
        self.pool = BufferPool(min_size=512)
        self.cases = 0

    async def setup(self) -> None:
        from trainer.config import PeerConfig
        from trainer.peer import Peer

        self.net = MemoryNetwork(LIMITS)
        transport = self.net.transport("mem")
        self.store = LayoutStore(self.initial.copy(), SCHEMA)
        cfg = AgentConfig(name=NODE_NAME, listen="mem:1", cluster=CLUSTER, gossip=FAST_GOSSIP)
        self.agent = Agent(cfg, self.store, transport, Events())
        await self.agent._start_node()
        self.node: Node = self.agent.node
        self.node.config = FAST_NODE
        assert self.agent.membership is not None
        self.task = asyncio.get_running_loop().create_task(self.agent.membership.run())
        self.peer = Peer(PeerConfig(name=NODE_NAME, allow_control=True), FakeTrainer(), transport)  # type: ignore[arg-type]
        self.peer.agent = self.agent
        self.node.handlers[MsgType.STATUS_REQ] = self.peer._on_status
        self.node.handlers[MsgType.CONTROL] = self.peer._on_control
        self.ctx = Context(self.store.nbytes, self.initial)

    def _restart(self) -> None:
        """Give the agent a new membership driver (a dead one fails every later case)."""
        old = self.agent.membership
        assert old is not None
        rng = random.Random(self.cases)
        swim = Swim(NODE_NAME, self.node.addr, SwimConfig.local(), rng, time.monotonic())
        self.agent.membership = Membership(swim, old._send, on_event=old.on_event)
        self.task = asyncio.get_running_loop().create_task(self.agent.membership.run())

    def gen(self, fz: Fuzzer) -> tuple[bytes, int, bool, int]:
        r = fz.rng
        script: list[int] = []
        if r.random() < 0.9:
            script.append(MsgType.HELLO)
        if r.random() < 0.5:
            script += r.choice(
                [
                    [MsgType.EXCH_OFFER, MsgType.EXCH_PAYLOAD],
                    [MsgType.EXCH_OFFER, MsgType.EXCH_PAYLOAD, MsgType.EXCH_OFFER],
                    [MsgType.PULL_REQ],
                    [MsgType.SWIM, MsgType.SWIM, MsgType.SWIM],
                    [MsgType.STATUS_REQ],
                    [MsgType.CONTROL],
                ]
            )
        data = fz.stream(self.ctx, script, extra=2)
        stall = r.random() < 0.001
        fail_at = r.choice([0] * 18 + [1, 2])
        return data, r.randrange(2**32), stall, fail_at

    async def run(self, case: tuple[bytes, int, bool, int]) -> None:
        data, seed, stall, fail_at = case
        self.cases += 1
        conn = FuzzConnection(
            data, random.Random(seed), LIMITS, self.pool, stall=stall, fail_send_at=fail_at
        )
        try:
            await self.node._serve(conn)
        finally:
            conn.close()
            if conn.bad_replies:
                raise Violation(f"replies over the limits: {conn.bad_replies[:3]}")
            # let the membership driver take what the SWIM handler delivered
            for _ in range(20):
                await asyncio.sleep(0)
                assert self.agent.membership is not None
                if not self.agent.membership._inbox:
                    break

    def check(self) -> None:
        ex = self.agent.exchanger
        if ex._busy or self.store.lock.locked() or self.node._serving:
            raise Violation(
                f"left behind: busy={ex._busy} locked={self.store.lock.locked()}"
                f" serving={self.node._serving}"
            )
        if not np.isfinite(self.store.weights).all():
            raise Violation("non-finite weights were applied")
        if self.task.done():
            _driver_died(self.task, self._restart)
        if self.cases % 64 == 0:
            np.copyto(self.store.weights, self.initial)  # keep accepted mixes from drifting
            _bounded("Node._pool_locks", len(self.node._pool_locks))
            _bounded("Exchanger.incompatible", len(ex.incompatible))
            _check_pool(self)

    async def teardown(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.agent.close(timeout=1.0)


class FakeTransport:
    """The asyncio transport under a ``_FrameProtocol``: what is written is decoded again as
    the remote peer would (a frame it refuses is a bad reply); close and abort end the
    connection the way asyncio does, with ``connection_lost`` on the next loop pass."""

    def __init__(self, proto: _FrameProtocol) -> None:
        self.proto = proto
        self.closing = False
        self.paused = False
        self.remote = Decoder(LIMITS)
        self.bad: list[str] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: Any) -> None:
        if self.closing:
            return
        try:
            self.remote.feed(data)
            self.remote.frames.clear()
        except FrameError as exc:
            self.bad.append(str(exc))
            self.remote = Decoder(LIMITS)

    def writelines(self, parts: Sequence[Any]) -> None:
        for part in parts:
            self.write(part)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    abort = close


class TcpTarget(StackTarget):
    """The same node behind the TCP code without a socket: ``_FrameProtocol`` fed the stream
    in reads of random sizes as the event loop would (pausing when it asks), a
    ``TcpConnection`` for the handlers, the peer resetting the connection now and then."""

    async def run(self, case: tuple[bytes, int, bool, int]) -> None:
        data, seed, stall, reset_at = case
        self.cases += 1
        rng = random.Random(seed)
        proto = _FrameProtocol(LIMITS, Stats(), self.pool)
        tr = FakeTransport(proto)
        proto.connection_made(tr)  # type: ignore[arg-type]
        conn = TcpConnection(proto, "10.0.0.201:7000")
        task = asyncio.get_running_loop().create_task(self.node._serve(conn))
        try:
            pos = reads = 0
            while pos < len(data) and not tr.closing and not task.done():
                if tr.paused:
                    await asyncio.sleep(0)  # the server reads queued frames, then resumes
                    continue
                buf = proto.get_buffer(-1)
                n = min(len(buf), len(data) - pos, rng.choice([1, 9, 16, 100, 4096, 1 << 20]))
                buf[:n] = data[pos : pos + n]
                pos += n
                proto.buffer_updated(n)
                reads += 1
                if reset_at and reads == reset_at:
                    tr.closing = True
                    proto.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
                if rng.random() < 0.5:
                    await asyncio.sleep(0)
            if not stall and not tr.closing:
                proto.eof_received()
                tr.closing = True
                proto.connection_lost(None)
            await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await self._settle()
            if tr.bad:
                raise Violation(f"a reply the peer cannot decode: {tr.bad[:3]}")

    async def _settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
            assert self.agent.membership is not None
            if not self.agent.membership._inbox:
                break


class MemnetTarget(StackTarget):
    """The same node reached over the in-memory network: a ``MemoryConnection`` whose
    server side receives the stream's bytes in random pieces, served by
    ``MemoryTransport._serve`` as the simulations use it."""

    async def setup(self) -> None:
        await super().setup()
        self.client = self.net.transport("client")

    async def run(self, case: tuple[bytes, int, bool, int]) -> None:
        data, seed, stall, _ = case
        self.cases += 1
        rng = random.Random(seed)
        served = self.agent.transport
        assert isinstance(served, MemoryTransport)
        before = set(served.tasks)
        client = await self.client.connect(self.node.addr, 1.0)
        assert isinstance(client, MemoryConnection) and client.other is not None
        (task,) = set(served.tasks) - before
        server_side = client.other
        try:
            pos = 0
            while pos < len(data) and not server_side.closed and not task.done():
                n = rng.choice([1, 9, 16, 100, 4096, 1 << 20])
                server_side._arrive(data[pos : pos + n])  # what the server receives
                pos += n
                if rng.random() < 0.5:
                    await asyncio.sleep(0)
            if not stall:
                client.close()
            await task
        finally:
            client.close()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for _ in range(20):
                await asyncio.sleep(0)
                assert self.agent.membership is not None
                if not self.agent.membership._inbox:
                    break


class ExchangeTarget:
    """``Exchanger._on_offer`` and ``_on_pull`` called directly: the request frame, then the
    rest of the stream on the same connection. One store in 40 is large enough for the
    streamed delta (DeltaStream's chunks)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed + 1)
        self.pool = BufferPool(min_size=512)
        self.sides = []
        for n in (WEIGHTS, BIG_WEIGHTS):
            w = rng.standard_normal(n).astype(np.float32)
            net = MemoryNetwork(LIMITS)
            node = Node(net.transport("mem"), "fuzz-exchanger", FAST_NODE)
            store = LayoutStore(w.copy(), SCHEMA)
            self.sides.append((Exchanger(node, store, FAST_GOSSIP), store, w, Context(w.nbytes, w)))
        self.cases = 0

    def gen(self, fz: Fuzzer) -> tuple[bytes, int, int, bool, int]:
        r = fz.rng
        side = 1 if r.random() < 0.025 else 0
        ctx = self.sides[side][3]
        first = r.choice([MsgType.EXCH_OFFER] * 3 + [MsgType.PULL_REQ])
        script = [first, MsgType.EXCH_PAYLOAD] if first == MsgType.EXCH_OFFER else [first]
        data = fz.stream(ctx, script, extra=1)
        return data, side, r.randrange(2**32), r.random() < 0.002, r.choice([0] * 9 + [1, 2])

    async def run(self, case: tuple[bytes, int, int, bool, int]) -> None:
        data, side, seed, stall, fail_at = case
        self.cases += 1
        ex = self.sides[side][0]
        rng = random.Random(seed)
        conn = FuzzConnection(data, rng, LIMITS, self.pool, fail_send_at=fail_at)
        try:
            frame = await conn.recv()
        except ConnectionClosed:
            return  # the decoder refused the request: nothing reaches the handler
        conn.stall = stall  # silent after the request: the handler's deadlines must end it
        handler = ex._on_offer if rng.random() < 0.5 else ex._on_pull
        if frame.type == MsgType.EXCH_OFFER:
            handler = ex._on_offer
        elif frame.type == MsgType.PULL_REQ:
            handler = ex._on_pull
        try:
            await handler(conn, frame)
        finally:
            if conn.bad_replies:
                raise Violation(f"replies over the limits: {conn.bad_replies[:3]}")

    def check(self) -> None:
        for ex, store, initial, _ in self.sides:
            if ex._busy or store.lock.locked():
                raise Violation(f"left behind: busy={ex._busy} locked={store.lock.locked()}")
            if not np.isfinite(store.weights).all():
                raise Violation("non-finite weights were applied")
            if self.cases % 64 == 0:
                np.copyto(store.weights, initial)
                _bounded("Exchanger.incompatible", len(ex.incompatible))
        _check_pool(self)


class FuzzTransport(Transport):
    """A transport whose next ``connect`` returns the connection put in ``pending``."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.pending: Connection | None = None

    async def listen(self, host: str, port: int, handler: Any) -> tuple[str, int]:
        raise TransportError("a fuzz transport does not listen")

    async def connect(self, addr: str, timeout: float) -> Connection:
        conn, self.pending = self.pending, None
        if conn is None:
            raise TransportError(f"connect to {addr}: Connection refused")
        return conn

    async def close(self) -> None:
        pass


class ClientTarget:
    """The calling side, answered by the stream: ``Node.open`` (the handshake reply),
    ``Exchanger.exchange`` (accept or decline, then the responder's payload; it promises
    never to raise) and ``Exchanger.pull`` (the catch-up reply)."""

    OPS = ("open", "exchange", "exchange", "pull")
    ADDR = "10.0.0.9:7000"

    def __init__(self, seed: int) -> None:
        self.initial = np.random.default_rng(seed + 3).standard_normal(WEIGHTS).astype(np.float32)
        self.store = LayoutStore(self.initial.copy(), SCHEMA)
        self.transport = FuzzTransport()
        self.node = Node(self.transport, "fuzz-client", FAST_NODE)
        self.exchanger = Exchanger(self.node, self.store, FAST_GOSSIP)
        self.pool = BufferPool(min_size=512)
        self.ctx = Context(self.store.nbytes, self.initial)
        self.cases = 0

    def gen(self, fz: Fuzzer) -> tuple[bytes, int, str, bool]:
        r = fz.rng
        op = r.choice(self.OPS)
        script: list[int] = [MsgType.HELLO_OK]
        if op == "exchange":
            script += r.choice(
                [[MsgType.EXCH_ACCEPT, MsgType.EXCH_PAYLOAD]] * 3
                + [[MsgType.EXCH_DECLINE], [MsgType.ERROR], [MsgType.EXCH_ACCEPT, MsgType.ERROR]]
            )
        elif op == "pull":
            script.append(r.choice([MsgType.PULL_REPLY] * 3 + [MsgType.ERROR]))
        data = fz.stream(self.ctx, script, extra=1)
        return data, r.randrange(2**32), op, r.random() < 0.002

    async def run(self, case: tuple[bytes, int, str, bool]) -> None:
        data, seed, op, stall = case
        self.cases += 1
        rng = random.Random(seed)
        self.exchanger.close()  # a fresh dial each time: the kept connection is spent
        self.transport.pending = FuzzConnection(data, rng, LIMITS, self.pool, stall=stall)
        if op == "open":
            conn = await self.node.open(self.ADDR)
            conn.close()
        elif op == "pull":
            await self.exchanger.pull(self.ADDR)
        else:
            try:
                out = await self.exchanger.exchange(self.ADDR)
            except Exception as exc:
                raise Violation(f"Exchanger.exchange() raised {exc!r}"[:300]) from exc
            if not isinstance(out, Outcome) or not isinstance(out.reason, str):
                raise Violation(f"exchange() returned {short(out)}")

    def check(self) -> None:
        ex, store = self.exchanger, self.store
        if ex._busy or store.lock.locked():
            raise Violation(f"left behind: busy={ex._busy} locked={store.lock.locked()}")
        if not np.isfinite(store.weights).all():
            raise Violation("non-finite weights were applied")
        if self.cases % 64 == 0:
            np.copyto(store.weights, self.initial)
            _bounded("Exchanger.incompatible", len(ex.incompatible))
            _check_pool(self)


class PeerTarget:
    """``Peer._on_status`` and ``Peer._on_control`` on decoded frames (a Peer over a fake
    trainer: these handlers read a few counters and set ``slowdown``, no torch work)."""

    def __init__(self) -> None:
        from trainer.config import PeerConfig
        from trainer.peer import Peer

        net = MemoryNetwork(LIMITS)
        self.trainer = FakeTrainer()
        self.peer = Peer(
            PeerConfig(name=NODE_NAME, allow_control=True), self.trainer, net.transport("mem")
        )  # type: ignore[arg-type]
        self.ctx = Context(WEIGHTS * 4, None)

    def gen(self, fz: Fuzzer) -> tuple[bytes, int, int]:
        r = fz.rng
        t = r.choice([MsgType.CONTROL] * 4 + [MsgType.STATUS_REQ])
        return fz.frame_bytes(t, self.ctx, clean=0.3), r.randrange(2**32), r.choice([0] * 9 + [1])

    async def run(self, case: tuple[bytes, int, int]) -> None:
        data, seed, fail_at = case
        rng = random.Random(seed)
        dec = Decoder(LIMITS)
        try:
            frames = dec.feed(data)
        except FrameError:
            return
        conn = FuzzConnection(b"", rng, LIMITS, fail_send_at=fail_at)
        for frame in frames:
            if frame.type == MsgType.STATUS_REQ or rng.random() < 0.1:
                await self.peer._on_status(conn, frame)
            else:
                await self.peer._on_control(conn, frame)
        if conn.bad_replies:
            raise Violation(f"replies over the limits: {conn.bad_replies[:3]}")

    def check(self) -> None:
        s = self.trainer.slowdown
        if not (isinstance(s, float) and 0.0 <= s <= 999.0):
            raise Violation(f"slowdown set to {s!r}")


# -- the sealed layer -----------------------------------------------------------------------

# The swarm's keyring mid-rotation (two secrets, both accepted) and a stranger's. The harness
# holds them all: a caller that completes the handshake seals valid records, then breaks them.
SWARM = Keyring((b"fuzz-secret-0123456789abcdef", b"fuzz-secret-rotated-0123456789"))
STRANGER = Keyring((b"not-the-swarm-secret-0123456789",))
CALLER_RINGS = (Keyring((SWARM.keys[0],)), Keyring((SWARM.keys[1],)), STRANGER)
# The outer decoder must take one whole record (RECORD bytes and a tag: peers run with 64 MiB
# and more); what the records carry is decoded under the harness's LIMITS.
SEALED_LIMITS = Limits(LIMITS.max_header, RECORD + TAG, LIMITS.max_segments)
# A handshake is two X25519 operations and two HKDFs: under tracemalloc on a loaded machine
# 50 ms is tight. A stalled opening waits this long, so stalls are rare (1 in 500).
SECURE_NODE = replace(FAST_NODE, handshake_timeout=0.25, keyring=SWARM)
HEX64 = re.compile("[0-9a-fA-F]{64}")  # 32 bytes as the wire carries them
RECORD_NONCE = struct.Struct("!4xQ")  # a record's GCM nonce: its number in its direction
# What a caller does with its sealed records, and how often: most go through as sealed.
RECORD_OPS = (
    ("ok", 60), ("flip", 6), ("tag", 3), ("truncate", 3), ("replay", 3), ("reorder", 3),
    ("ahead", 2), ("reflect", 2), ("stranger", 2), ("clear", 3), ("error", 1), ("prefix", 4),
    ("huge", 2), ("header", 2), ("garbage", 4),
)  # fmt: skip
# Ops whose record no key of the connection opens (or no SEALED frame at all): from the first
# of them on, nothing may reach a handler and the connection must close.
OP_NAMES = tuple(name for name, _ in RECORD_OPS)
OP_WEIGHTS = tuple(weight for _, weight in RECORD_OPS)
BAD_OPS = frozenset(
    {"flip", "tag", "truncate", "replay", "reorder", "ahead", "reflect", "stranger", "clear",
     "error", "huge"}
)  # fmt: skip
ANSWERS = ("valid",) * 14 + ("extra", "proof", "proof", "proof", "type", "bytes", "silent")


class LiveConnection(FuzzConnection):
    """A FuzzConnection the harness writes to while the server reads it: a caller that
    answers what it is told. ``push`` adds bytes, ``end`` is the caller closing; what the
    server sends waits in ``outbox`` as (type, header, payload bytes). ``wake`` is set on
    anything the caller may be waiting for: a reply, a close, the server starved of input."""

    def __init__(self, rng: random.Random, pool: BufferPool | None = None) -> None:
        super().__init__(b"", rng, SEALED_LIMITS, pool)
        self.outbox: deque[tuple[int, dict[str, Any], bytes]] = deque()
        self.wake = asyncio.Event()
        self._arrived = asyncio.Event()
        self.ended = False
        self.starved = False  # the server waits for bytes and has read all we sent

    def push(self, data: bytes) -> None:
        self._data = memoryview(bytes(self._data[self._pos :]) + data)
        self._pos = 0
        self.starved = False
        self._arrived.set()

    def end(self) -> None:
        self.ended = True
        self._arrived.set()

    async def recv(self) -> Frame:
        while not self._frames:
            if self._error is not None:
                raise ConnectionClosed(str(self._error))
            if self._closed:
                raise ConnectionClosed("connection closed")
            if self._pos >= len(self._data):
                if self.ended:
                    raise ConnectionClosed("connection closed by peer")
                self.starved = True
                self.wake.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            self._read_some()
        return self._frames.popleft()

    async def send(
        self, msg_type: int, header: dict[str, Any] | None = None, segments: Sequence[Any] = ()
    ) -> None:
        if not self._closed:
            payload = b"".join(memoryview(s).cast("B") for s in segments)
            self.outbox.append((msg_type, dict(header or {}), payload))
            self.wake.set()
        await super().send(msg_type, header, segments)

    def close(self) -> None:
        super().close()
        self.wake.set()

    async def reply(self, server: asyncio.Task[None]) -> tuple[int, dict[str, Any], bytes] | None:
        """The server's next frame, or None once it has ended, closed, or wants more input."""
        while not self.outbox:
            if server.done() or self._closed or self.starved:
                return None
            self.wake.clear()
            await self.wake.wait()
        return self.outbox.popleft()


class SealedNode(Node):
    """A Node that keeps the sealed connection of its last handshake: what it received is
    what the target checks after a record that fails authentication."""

    sealed: SealedConnection | None = None

    async def _authenticate(self, conn: Connection, hello: Frame) -> Connection | None:
        sealed = await super()._authenticate(conn, hello)
        self.sealed = sealed if isinstance(sealed, SealedConnection) else None
        return sealed


@dataclass
class SecurePlan:
    """What the caller does, beyond the bytes of the case: everything that depends on the
    server's answer (its nonce and key are fresh each time) is made at run time from
    ``seed``, so that the case replays."""

    seed: int
    ring: int  # the caller's keyring: CALLER_RINGS[ring]
    key: bytes  # the caller's X25519 private key ...
    nonce: bytes  # ... and nonce, as in its opening
    opening: int  # bytes of the case that are the opening; the rest are record plaintext
    answer: str  # ANSWERS
    records: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, op)


class SecureTarget:
    """``Node._serve`` with a keyring: the server's side of the handshake (HELLO, AUTH) fed
    valid, mutated and random openings and answers, and after a handshake the harness
    completed with the swarm's secret, sealed records valid and broken (bits and tags
    flipped, truncated, replayed, reordered, sealed ahead or with the wrong key, frames in
    the clear, prefixes that lie) carrying frames valid and broken. A handler records what
    reaches it: nothing may, from a record that fails authentication on; such a record must
    close the connection; a refused caller hears "authentication failed" and nothing else;
    every sealed reply opens with the caller's key, in order, and decodes under ``LIMITS``."""

    def __init__(self, seed: int) -> None:
        self.node = SealedNode(MemoryNetwork(LIMITS).transport("mem"), NODE_NAME, SECURE_NODE)
        for t in MsgType:
            self.node.handlers[t] = self._on_frame
        self.pool = BufferPool(min_size=512)
        self.ctx = Context(WEIGHTS * 4, None)
        self.seen: list[tuple[int, int]] = []  # (type, records opened when it was handled)
        self.clear: list[int] = []  # types handled on a connection that is not sealed
        self.cases = 0

    async def _on_frame(self, conn: Connection, frame: Frame) -> None:
        if not isinstance(conn, SealedConnection):
            self.clear.append(frame.type)
        self.seen.append((frame.type, getattr(conn, "_received", -1)))
        payload = bytes(frame.payload)
        frame.release()
        if frame.type == MsgType.STATUS_REQ:  # a sealed reply: one record, or several
            segs = [payload] if payload else [b"\x01" * 70_000] if len(self.seen) % 2 else []
            await conn.send(MsgType.STATUS, {"name": NODE_NAME, "n": len(self.seen)}, segs)

    # -- inputs ---------------------------------------------------------------------------
    def gen(self, fz: Fuzzer) -> tuple[bytes, SecurePlan]:
        r = fz.rng
        ring = r.choice([0] * 8 + [1, 2])
        key, nonce = r.randbytes(32), r.randbytes(32)
        opening = self._opening(fz, CALLER_RINGS[ring], key, nonce)
        plan = SecurePlan(r.randrange(2**32), ring, key, nonce, len(opening), r.choice(ANSWERS))
        fz.frames += 1  # the answer
        script = [MsgType.HELLO] + r.choice(
            [[MsgType.STATUS_REQ], [MsgType.SWIM, MsgType.STATUS_REQ], [MsgType.CONTROL], []]
        )
        plain = fz.stream(self.ctx, script, extra=2)
        if r.random() < 0.003:  # a frame of a full-size record's worth (its payload echoed)
            plain += fz._encode(MsgType.STATUS_REQ, {}, [r.randbytes(RECORD - 64)]) + plain
        plan.records = self._cuts(fz, plan.opening, len(plain))
        return opening + plain, plan

    def _opening(self, fz: Fuzzer, ring: Keyring, key: bytes, nonce: bytes) -> bytes:
        """The caller's HELLO: valid, with a field broken, byte-mutated, another frame, noise."""
        r = fz.rng
        fz.frames += 1
        dh = _public(X25519PrivateKey.from_private_bytes(key))
        hello: dict[str, Any] = {"versions": [1], "kid": key_id(ring.primary),
                                 "nonce": nonce.hex(), "dh": dh.hex(),
                                 "tag": member_tag(ring.primary, "fuzz-caller")}  # fmt: skip
        k = r.random()
        if k < 0.55:
            return fz._encode(MsgType.HELLO, hello, [])
        if k < 0.75:
            return fz._encode(MsgType.HELLO, self._bad_field(fz, hello), [])
        if k < 0.83:
            return fz._encode(MsgType.HELLO, fz.maybe_wrong(hello, 1.0), [])
        data = fz._encode(MsgType.HELLO, hello, [])
        if k < 0.93:
            return r.choice(
                [
                    lambda: fz._mutate_bytes(data),
                    lambda: data[: r.randrange(len(data))],
                    lambda: fz._prefix_lie(data),
                    lambda: fz._seg_lie(MsgType.HELLO, hello, [r.randbytes(r.choice([0, 4]))]),
                ]
            )()
        if k < 0.97:
            fz.frames -= 1  # frame_bytes counts it
            t = r.choice([MsgType.AUTH, MsgType.SEALED, MsgType.ERROR, MsgType.STATUS_REQ])
            return fz.frame_bytes(t, self.ctx, clean=0.5)
        if k < 0.985:
            return (
                fz._garbage_header(MsgType.HELLO) if r.random() < 0.5 else fz._huge(MsgType.HELLO)
            )
        return r.randbytes(r.choice([1, 15, 16, 17, 100]))

    @staticmethod
    def _bad_field(fz: Fuzzer, hello: dict[str, Any]) -> dict[str, Any]:
        """One of kid, nonce, dh wrong: another key's id, a length off by one byte or one
        digit, not hex, hex with spaces (``bytes.fromhex`` skips them), non-ASCII, bytes,
        a low-order point, nested, or missing."""
        r = fz.rng
        h = dict(hello)
        name = r.choice(["kid", "nonce", "dh"])
        good: str = h[name]
        if r.random() < 0.08:
            del h[name]
            return h
        bad: list[Any] = [good[:-2], good + "00", good[:-1], "zz" + good[2:], "  " + good[2:],
                          good[:30] + "  " + good[32:], "\u00e9" * len(good), good.upper(),
                          good[:-2] + "\u0660\u0661", bytes.fromhex(good), [good], {"k": good},
                          _deep(990, good), fz.nasty()]  # fmt: skip
        if name == "kid":
            bad += [key_id(STRANGER.primary), key_id(SWARM.keys[1]), "", "0" * 16]
        elif name == "dh":
            bad += ["00" * 32, "01" + "00" * 31, "ff" * 32, r.randbytes(32).hex()]
        else:
            bad += ["00" * 32, r.randbytes(32).hex()]
        h[name] = r.choice(bad)
        return h

    @staticmethod
    def _cuts(fz: Fuzzer, start: int, n: int) -> list[tuple[int, int, str]]:
        """The plaintext cut into records (now and then many tiny ones), each with an op."""
        r = fz.rng
        pieces = r.choice([1, 1, 2, 3, 4, 8]) if r.random() < 0.97 else 40
        low = 0
        if n > RECORD:  # a full-size record first, or (3 in 10) one a byte over: refused
            low = RECORD + (r.random() < 0.3)
        bounds = sorted({0, n, low, *(r.randrange(low, n + 1) for _ in range(pieces - 1))})
        cuts = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            op = r.choices(OP_NAMES, OP_WEIGHTS)[0] if r.random() < 0.4 else "ok"
            cuts.append((start + a, start + b, op))
        if r.random() < 0.2 and cuts:  # one more, sealed again after the first bad record
            cuts.append(cuts[-1][:2] + ("ok",))
        fz.frames += len(cuts)
        return cuts

    # -- a case ---------------------------------------------------------------------------
    async def run(self, case: tuple[bytes, SecurePlan]) -> None:
        blob, plan = case
        self.cases += 1
        self.seen.clear()
        self.clear.clear()
        self.node.sealed = None
        rng = random.Random(plan.seed)
        conn = LiveConnection(rng, self.pool)
        server = asyncio.get_running_loop().create_task(self.node._serve(conn))
        server.add_done_callback(lambda _: conn.wake.set())
        first_bad: int | None = None
        keys: tuple[AESGCM, AESGCM] | None = None
        try:
            keys = await self._handshake(conn, server, blob, plan, Fuzzer(rng))
            if keys is not None:
                first_bad = await self._send_records(conn, blob, plan, keys, Fuzzer(rng))
            if not conn.stall and rng.random() < 0.998:
                conn.end()  # else the caller goes silent: the idle deadline must end it
            await server
        finally:
            if not server.done():
                server.cancel()
                await asyncio.gather(server, return_exceptions=True)
            self._verify(conn, keys, first_bad)

    async def _handshake(
        self,
        conn: LiveConnection,
        server: asyncio.Task[None],
        blob: bytes,
        plan: SecurePlan,
        fz: Fuzzer,
    ) -> tuple[AESGCM, AESGCM] | None:
        """Send the opening; answer a challenge. The caller's (send, receive) ciphers when it
        sent a valid proof, else None."""
        ring = CALLER_RINGS[plan.ring]
        conn.push(blob[: plan.opening])
        reply = await conn.reply(server)
        if reply is None:
            return None
        if reply[0] != MsgType.AUTH:
            conn.outbox.appendleft(reply)  # what a refused caller heard: checked later
            return None
        self._challenged(blob[: plan.opening])
        state = ClientState(plan.nonce, X25519PrivateKey.from_private_bytes(plan.key))
        try:
            proof, keys = client_verify(ring, state, reply[1])
        except AuthError:  # the server saw another opening than ours (a mutated field)
            conn.push(fz._encode(MsgType.AUTH, {"proof": fz.rng.randbytes(32).hex()}, []))
            return None
        answer, valid = self._answer(fz, plan.answer, proof["proof"], reply[1])
        if answer is None:
            conn.stall = True
            return None
        conn.push(answer)
        return keys if valid else None

    @staticmethod
    def _challenged(opening: bytes) -> None:
        """A challenge answers only an opening whose nonce and key are what the protocol
        says: 32 bytes each, as 64 hex digits (anything else makes the transcript, which
        both proofs cover, mean something else than the bytes it is made of)."""
        dec = Decoder(SEALED_LIMITS)
        frames: list[Frame] = []
        while not frames and opening:  # the first frame alone, as the server read it
            n = dec.needed
            frames = dec.feed(opening[:n])
            opening = opening[n:]
        hello = frames[0].header if frames else {}
        for name in ("nonce", "dh"):
            value = hello.get(name)
            if not (isinstance(value, str) and HEX64.fullmatch(value)):
                raise Violation(f"challenged an opening whose {name} is {short(value)}")

    @staticmethod
    def _answer(
        fz: Fuzzer, kind: str, proof: str, challenge: dict[str, Any]
    ) -> tuple[bytes | None, bool]:
        """The caller's AUTH, and whether it holds a proof the server must accept."""
        r = fz.rng
        if kind == "valid":
            return fz._encode(MsgType.AUTH, {"proof": proof}, []), True
        if kind == "extra":
            return fz._encode(MsgType.AUTH, {"proof": proof, fz.key(): fz.nasty()}, []), True
        if kind == "proof":
            i = r.randrange(len(proof))
            flipped = proof[:i] + ("0" if proof[i] != "0" else "1") + proof[i + 1 :]
            bad = r.choice([flipped, proof.upper(), proof[:-1], proof + "0", " " + proof[1:],
                            challenge.get("proof"), bytes.fromhex(proof), "\u00e9" * len(proof),
                            proof[:-1] + "\u00e9", [proof], None, _deep(990, proof),
                            fz.nasty()])  # fmt: skip
            return fz._encode(MsgType.AUTH, {"proof": bad}, []), False
        if kind == "type":
            t = r.choice([MsgType.HELLO, MsgType.SEALED, MsgType.ERROR, MsgType.STATUS_REQ])
            return fz._encode(t, {"proof": proof}, [r.randbytes(r.choice([0, 16, 40]))]), False
        if kind == "bytes":  # may still hold the proof: not counted as one
            data = fz._encode(MsgType.AUTH, {"proof": proof}, [])
            return r.choice([fz._mutate_bytes(data), data[: r.randrange(len(data))]]), False
        if r.random() < 0.01:
            return None, False  # silent: the handshake deadline must end it
        return b"", False

    async def _send_records(
        self,
        conn: LiveConnection,
        blob: bytes,
        plan: SecurePlan,
        keys: tuple[AESGCM, AESGCM],
        fz: Fuzzer,
    ) -> int | None:
        """Seal the plan's records and send them; the number of records the server could
        open before the first it cannot (None: it can open them all)."""
        r = fz.rng
        counter = 0  # the next record's number, as the server counts records
        sent: list[bytes] = []
        first_bad: int | None = None
        for start, end, op in plan.records:
            chunk = blob[start:end]
            if op in BAD_OPS and first_bad is None:
                first_bad = counter
            data, counted = self._record(fz, op, chunk, counter, keys, sent)
            counter += counted
            conn.push(data)
            if r.random() < 0.3:
                await asyncio.sleep(0)
        return first_bad

    @staticmethod
    def _record(
        fz: Fuzzer, op: str, chunk: bytes, n: int, keys: tuple[AESGCM, AESGCM], sent: list[bytes]
    ) -> tuple[bytes, int]:
        """The bytes of one op on record ``n``, and how many records the server counts in
        them (every SEALED frame of at least a tag's length)."""
        r = fz.rng
        send, receive = keys

        def sealed(record: bytes, header: dict[str, Any] | None = None) -> bytes:
            data = fz._encode(MsgType.SEALED, header or {}, [record])
            sent.append(data)
            return data

        def seal(i: int, plain: bytes, aead: AESGCM = send) -> bytes:
            return aead.encrypt(RECORD_NONCE.pack(i % 2**64), plain, None)

        if op in ("ok", "garbage", "header", "prefix"):
            if op == "garbage":  # authentic, but not frames: the inner decoder's to refuse
                chunk = r.choice([r.randbytes(len(chunk) or 1), fz._prefix_lie(PREFIX.pack(
                    MAGIC, MsgType.SWIM, 0, 4, 0) + b"\x80" * 4)])  # fmt: skip
            head = {fz.key(): fz.nasty()} if op == "header" else {}
            data = sealed(seal(n, chunk), head)
            return (fz._prefix_lie(data) if op == "prefix" else data), 1
        if op == "flip":
            rec = bytearray(seal(n, chunk))
            rec[r.randrange(len(rec))] ^= 1 << r.randrange(8)
            return sealed(bytes(rec)), 1
        if op == "tag":
            rec = seal(n, chunk)
            return sealed(
                rec[:-TAG] + r.choice([bytes(TAG), r.randbytes(TAG), rec[-TAG:][::-1]])
            ), 1
        if op == "truncate":
            rec = seal(n, chunk)
            cut = rec[: r.randrange(len(rec))]
            return sealed(cut), int(len(cut) >= TAG)
        if op == "replay":
            return (r.choice(sent) if sent else sealed(seal(n + 1, chunk))), 1
        if op == "reorder":  # this record's two halves, the second sealed first
            half = len(chunk) // 2
            return sealed(seal(n + 1, chunk[half:])) + sealed(seal(n, chunk[:half])), 2
        if op == "ahead":  # one record dropped
            return sealed(seal(n + r.choice([1, 2, 2**32, 2**64 - 1]), chunk)), 1
        if op == "reflect":  # what the server would send: the other direction's key
            return sealed(seal(n, chunk, receive)), 1
        if op == "stranger":
            return sealed(AESGCM(r.randbytes(32)).encrypt(RECORD_NONCE.pack(n), chunk, None)), 1
        if op == "clear":  # the plaintext, or one frame of it, unsealed
            return r.choice([chunk, fz._encode(MsgType.STATUS_REQ, {}, [])]), 0
        if op == "error":
            return fz._encode(MsgType.ERROR, {"reason": "authentication failed"}, []), 0
        # huge: a SEALED prefix that declares more than any record may be
        plen = r.choice([RECORD + TAG + 1, 2 << 30, 2**64 - 1])
        return PREFIX.pack(MAGIC, MsgType.SEALED, 0, 1, plen) + b"\x80" + chunk[:100], 0

    # -- what must hold -------------------------------------------------------------------
    def _verify(
        self, conn: LiveConnection, keys: tuple[AESGCM, AESGCM] | None, first_bad: int | None
    ) -> None:
        if self.clear:
            raise Violation(f"frames of types {self.clear[:5]} handled on a connection not sealed")
        sealed = self.node.sealed
        if sealed is None:
            self._refused(conn, keys)
            return
        if first_bad is not None:
            late = [t for t, opened in self.seen if opened > first_bad]
            if late:
                raise Violation(
                    f"frames of types {late[:5]} handled after record {first_bad}, which "
                    f"failed authentication ({len(self.seen)} handled)"
                )
            if sealed._received > first_bad and not conn._closed:
                raise Violation(f"record {first_bad} failed authentication; connection open")
        if keys is not None:
            self._open_replies(conn, keys[1])

    def _refused(self, conn: LiveConnection, keys: tuple[AESGCM, AESGCM] | None) -> None:
        """No handshake: nothing handled, and the caller heard one thing at most."""
        if self.seen:
            raise Violation(f"{len(self.seen)} frames handled without a handshake")
        said = [(t, h) for t, h, _ in conn.outbox]
        if keys is not None and said:
            raise Violation(f"a caller with a valid proof was refused: {short(said)}")
        if said and said != [(MsgType.ERROR, {"reason": AUTH_FAILED})]:
            raise Violation(f"a refused caller was told {short(said)}")

    @staticmethod
    def _open_replies(conn: LiveConnection, recv: AESGCM) -> None:
        """Every reply after the handshake is a record the caller opens, in order."""
        dec = Decoder(LIMITS)
        for i, (t, _, payload) in enumerate(conn.outbox):
            if t != MsgType.SEALED:
                raise Violation(f"a frame of type {t} in the clear on a sealed connection")
            try:
                dec.feed(recv.decrypt(RECORD_NONCE.pack(i), payload, None))
            except InvalidTag:
                raise Violation(f"sealed reply {i} does not open with the caller's key") from None
            except FrameError as exc:
                raise Violation(f"sealed reply {i} holds a frame we refuse: {exc}") from None
            dec.frames.clear()

    def check(self) -> None:
        if self.node._serving:
            raise Violation(f"left behind: serving={self.node._serving}")
        if self.cases % 64 == 0:
            _check_pool(self)


def make_targets(seed: int, names: Sequence[str] | None = None) -> list[Target]:
    """The targets, in run order, each with its share of the frames (only those named)."""

    def decoder() -> Target:
        d = DecoderTarget()
        return Target("decoder", d.gen, d.run, (FrameError,), weight=0.25)

    def swim() -> Target:
        s = SwimTarget(seed)
        return Target("swim", s.gen, s.run, (), s.check, weight=0.2)

    def membership() -> Target:
        m = MembershipTarget(seed)
        return Target("membership", m.gen, m.run, (), m.check, m.setup, m.teardown, weight=0.1)

    def node() -> Target:
        n = StackTarget(seed)
        return Target("node", n.gen, n.run, SERVE_ERRORS, n.check, n.setup, n.teardown, 0.15)

    def tcp() -> Target:
        n = TcpTarget(seed + 1)
        return Target("tcp", n.gen, n.run, SERVE_ERRORS, n.check, n.setup, n.teardown, 0.06)

    def memnet() -> Target:
        n = MemnetTarget(seed + 2)
        return Target("memnet", n.gen, n.run, SERVE_ERRORS, n.check, n.setup, n.teardown, 0.04)

    def exchange() -> Target:
        e = ExchangeTarget(seed)
        return Target("exchange", e.gen, e.run, SERVE_ERRORS, e.check, weight=0.12)

    def client() -> Target:
        c = ClientTarget(seed)
        return Target("client", c.gen, c.run, CLIENT_ERRORS, c.check, weight=0.08)

    def peer() -> Target:
        p = PeerTarget()
        return Target("peer", p.gen, p.run, SERVE_ERRORS, p.check, weight=0.08)

    def secure() -> Target:
        s = SecureTarget(seed)
        # AuthError is a TransportError: named for what the sealed layer documents.
        return Target("secure", s.gen, s.run, (AuthError, *SERVE_ERRORS), s.check, weight=0.08)

    makers = {"decoder": decoder, "swim": swim, "membership": membership, "node": node,
              "tcp": tcp, "memnet": memnet, "exchange": exchange, "client": client,
              "peer": peer, "secure": secure}  # fmt: skip
    unknown = set(names or ()) - set(makers)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; known: {', '.join(makers)}")
    return [make() for name, make in makers.items() if names is None or name in names]


# -- the runner -----------------------------------------------------------------------------


@dataclass
class Finding:
    target: str
    case: int
    kind: str  # crash, hang, memory, leak
    error: str
    where: str
    input: str
    count: int = 1


@dataclass
class TargetResult:
    name: str
    cases: int = 0
    frames: int = 0
    rejected: int = 0  # cases that ended in one of the allowed errors
    crashes: int = 0
    hangs: int = 0
    memory: int = 0
    peak_case_bytes: int = 0  # largest allocation peak of one case, above its start
    peak_case: int = -1  # ... in this case
    peak_case_input: int = 0  # ... whose input had this many bytes
    traced_cases: int = 0  # cases run under tracemalloc
    retained_blocks: int = 0  # Python memory blocks held after the run minus before it
    rss_growth_bytes: int = 0  # resident set size after the run minus before it
    retained_bytes: int = 0  # traced memory held after the run minus before it
    seconds: float = 0.0


@dataclass
class Report:
    frames: int
    seed: int
    targets: list[TargetResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    peak_traced_bytes: int = 0
    max_rss_bytes: int = 0

    @property
    def failures(self) -> int:
        return sum(t.crashes + t.hangs + t.memory for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "seed": self.seed,
            "seconds": round(self.seconds, 2),
            "crashes": sum(t.crashes for t in self.targets),
            "hangs": sum(t.hangs for t in self.targets),
            "memory_violations": sum(t.memory for t in self.targets),
            "peak_traced_bytes": self.peak_traced_bytes,
            "max_rss_bytes": self.max_rss_bytes,
            "limits": {
                "max_header": LIMITS.max_header,
                "max_payload": LIMITS.max_payload,
                "max_segments": LIMITS.max_segments,
            },
            "targets": [vars(t) | {"seconds": round(t.seconds, 2)} for t in self.targets],
            "findings": [vars(f) for f in self.findings],
        }


def _where(exc: BaseException) -> str:
    """The innermost traceback frame in the project's code (file:line function)."""
    if exc.__cause__ is not None and exc.__cause__.__traceback__ is not None:
        exc = exc.__cause__  # a Violation wrapping what the code raised: where that was
    best = "?"
    for fs in traceback.extract_tb(exc.__traceback__):
        path = Path(fs.filename)
        if path.is_relative_to(ROOT) and "benchmarks" not in path.parts:
            best = f"{path.relative_to(ROOT)}:{fs.lineno} {fs.name}"
    if best == "?":
        tb = traceback.extract_tb(exc.__traceback__)
        if tb:
            best = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].name}"
    return best


def _describe_input(case: Any) -> str:
    if isinstance(case, tuple) and case and isinstance(case[0], bytes):
        data = case[0]
        return f"{len(data)} bytes: {base64.b64encode(data[:600]).decode()}"
    return short(case)


class LogCheck(logging.Handler):
    """Formats every record (INFO and up) the code under test logs, as any handler would:
    a message that cannot be formatted (a peer's value nested too deep to print, say)
    is an exception that logging swallows and prints, once per record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.failures: list[tuple[str, BaseException]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.getMessage()
        except Exception as exc:  # noqa: BLE001 - what logging's handleError would print
            where = f"{Path(record.pathname).relative_to(ROOT)}:{record.lineno} {record.funcName}"
            self.failures.append((where, exc))


def _case_rng(seed: int, target: str, index: int) -> random.Random:
    tag = int.from_bytes(target.encode()[:8], "big")
    return random.Random((seed << 96) ^ (tag << 32) ^ index)


def _watchdog(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)


def _on_vtalrm(signum: int, frame: Any) -> None:
    raise Hang("case used its whole CPU-time budget")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Runner:
    """Runs targets case by case. ``trace_every``: 1 keeps tracemalloc on throughout (each
    case's peak, bytes retained per target: exact, ~4x slower); N > 1 starts it for every
    Nth case only (retained memory then counted in allocated blocks); 0 never."""

    def __init__(
        self, seed: int, case_timeout: float = 5.0, trace_every: int = 1, max_findings: int = 50
    ) -> None:
        self.seed = seed
        self.case_timeout = case_timeout
        self.trace_every = trace_every
        self.max_findings = max_findings
        self.logs = LogCheck()

    def _record(self, report: Report, finding: Finding) -> None:
        for f in report.findings:
            if (f.target, f.kind, f.error.split(":")[0], f.where) == (
                finding.target,
                finding.kind,
                finding.error.split(":")[0],
                finding.where,
            ):
                f.count += 1
                return
        if len(report.findings) < self.max_findings:
            report.findings.append(finding)

    async def run_target(self, t: Target, frames: int, report: Report) -> TargetResult:
        res = TargetResult(t.name)
        if t.setup is not None:
            await t.setup()
        base = blocks = rss = -1
        t0 = time.perf_counter()
        is_async = inspect.iscoroutinefunction(t.run)
        fz = Fuzzer(random.Random(0))
        try:
            while fz.frames < frames:
                if res.cases == WARM_UP:
                    gc.collect()  # what the first cases import or build is no leak
                    base = tracemalloc.get_traced_memory()[0] if self.trace_every == 1 else 0
                    blocks, rss = sys.getallocatedblocks(), _rss()
                i = res.cases
                fz.rng = _case_rng(self.seed, t.name, i)
                before = fz.frames
                case = t.gen(fz)
                if fz.frames == before:
                    fz.frames += 1
                res.cases += 1
                await self._one(t, i, case, is_async, res, report)
            res.frames = fz.frames
        finally:
            if t.teardown is not None:
                await t.teardown()
        res.seconds = time.perf_counter() - t0
        if base < 0:
            return res
        gc.collect()
        res.retained_blocks = sys.getallocatedblocks() - blocks
        res.rss_growth_bytes = _rss() - rss
        leak = ""
        if self.trace_every == 1:
            res.retained_bytes = tracemalloc.get_traced_memory()[0] - base
            if res.retained_bytes > LEAK_BOUND:
                leak = f"{res.retained_bytes} bytes retained"
        elif res.retained_blocks > LEAK_BLOCKS:
            leak = f"{res.retained_blocks} memory blocks retained"
        if leak:
            res.memory += 1
            top = ""
            if self.trace_every == 1:
                top = "; ".join(
                    str(s) for s in tracemalloc.take_snapshot().statistics("lineno")[:3]
                )
            self._record(report, Finding(t.name, res.cases, "leak", leak, top, ""))
        return res

    async def _one(
        self, t: Target, i: int, case: Any, is_async: bool, res: TargetResult, report: Report
    ) -> None:
        size = len(case[0]) if isinstance(case, tuple) and isinstance(case[0], bytes) else 0
        traced = self.trace_every > 0 and i % self.trace_every == 0
        if traced:
            if self.trace_every > 1:
                tracemalloc.start()
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        kind = error = where = ""
        exc: BaseException | None = None
        timer = asyncio.timeout(self.case_timeout)
        _watchdog(self.case_timeout)
        try:
            if is_async:
                async with timer:
                    await t.run(case)  # type: ignore[misc]
            else:
                t.run(case)
            if t.check is not None:
                t.check()
        except Hang as e:
            kind, exc = "hang", e
        except TimeoutError as e:
            if timer.expired():
                kind, exc = "hang", e
            elif TimeoutError in t.allowed:
                res.rejected += 1
            else:
                kind, exc = "crash", e
        except t.allowed:
            res.rejected += 1
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - a finding
            kind, exc = "crash", e
        finally:
            _watchdog(0)
        if exc is None and self.logs.failures:
            where, exc = self.logs.failures[0]
            kind, exc = "crash", RuntimeError(f"log record cannot be formatted: {exc!r}"[:300])
        self.logs.failures.clear()
        if exc is not None:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            where = where or _where(exc)
            if kind == "hang":
                res.hangs += 1
            else:
                res.crashes += 1
            self._record(report, Finding(t.name, i, kind, error, where, _describe_input(case)))
        if traced:
            peak = tracemalloc.get_traced_memory()[1] - start
            if self.trace_every > 1:
                tracemalloc.stop()
            res.traced_cases += 1
            if peak > res.peak_case_bytes:
                res.peak_case_bytes, res.peak_case, res.peak_case_input = peak, i, size
            budget = HEADER_AMPLIFICATION * size + LIMITS.max_payload + CASE_SLACK
            if peak > budget:
                res.memory += 1
                self._record(
                    report,
                    Finding(
                        t.name,
                        i,
                        "memory",
                        f"case allocated {peak} bytes (budget {budget})",
                        "",
                        _describe_input(case),
                    ),  # fmt: skip
                )

    async def run(self, targets: list[Target], frames: int) -> Report:
        report = Report(frames, self.seed)
        total_w = sum(t.weight for t in targets)
        t0 = time.perf_counter()
        for t in targets:
            share = max(1, round(frames * t.weight / total_w))
            res = await self.run_target(t, share, report)
            report.targets.append(res)
        report.seconds = time.perf_counter() - t0
        return report


def run_fuzz(
    frames: int,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    case_timeout: float = 5.0,
    trace_every: int = 1,
) -> Report:
    """Run the harness in a fresh event loop. Meanwhile the root logger has one handler, the
    harness's ``LogCheck``, at INFO: handlers log refused input, which is the point here,
    and those records are checked, not kept or printed."""
    old = signal.signal(signal.SIGVTALRM, _on_vtalrm)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    if tracemalloc.is_tracing():
        raise RuntimeError("run_fuzz starts and stops tracemalloc itself")
    runner = Runner(seed, case_timeout, trace_every)
    root.handlers, root.level = [runner.logs], logging.INFO
    if trace_every == 1:
        tracemalloc.start()
    try:
        made = make_targets(seed, targets)
        report = asyncio.run(runner.run(made, frames))
        if trace_every == 1:
            report.peak_traced_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        root.handlers, root.level = saved
        signal.signal(signal.SIGVTALRM, old)
    report.max_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def replay(seed: int, spec: str) -> int:
    """Run one case again on fresh state and print its input and outcome."""
    name, _, index = spec.partition(":")
    (target,) = make_targets(seed, [name])
    logging.basicConfig(level=logging.DEBUG)

    async def go() -> None:
        if target.setup is not None:
            await target.setup()
        try:
            fz = Fuzzer(_case_rng(seed, name, int(index)))
            case = target.gen(fz)
            print(f"input: {_describe_input(case)}")
            result = target.run(case)
            if inspect.isawaitable(result):
                async with asyncio.timeout(10):
                    await result
            if target.check is not None:
                target.check()
            print("no exception")
        finally:
            if target.teardown is not None:
                await target.teardown()

    try:
        asyncio.run(go())
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _tables(report: Report, trace_every: int) -> list[str]:
    from common import markdown_table

    rows = []
    for t in report.targets:
        kept = (
            f"{t.retained_bytes / 2**20:.2f} MiB"
            if trace_every == 1
            else f"{t.retained_blocks} blocks"
        )
        rows.append([t.name, t.cases, t.frames, t.rejected, t.crashes, t.hangs, t.memory,
                     f"{t.peak_case_bytes / 2**20:.1f} MiB", kept, f"{t.seconds:.1f}"])  # fmt: skip
    frames = sum(t.frames for t in report.targets)
    ts = report.targets
    rows.append(["all", sum(t.cases for t in ts), frames, "", sum(t.crashes for t in ts),
                 sum(t.hangs for t in ts), sum(t.memory for t in ts), "", "",
                 f"{report.seconds:.1f}"])  # fmt: skip
    head = ["target", "cases", "frames", "refused", "crashes", "hangs", "memory",
            "largest case peak", "retained", "s"]  # fmt: skip
    tables = [markdown_table(head, rows)]
    if report.findings:
        tables.append(markdown_table(
            ["kind", "target", "case", "times", "error", "where", "replay"],
            [[f.kind, f.target, f.case, f.count, f.error[:120], f.where,
              f"--seed {report.seed} --replay {f.target}:{f.case}"] for f in report.findings],
        ))  # fmt: skip
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, help="frames to feed, all targets (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="20,000 frames, tracemalloc every 20th")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the JSON here too")
    ap.add_argument("--targets", help="comma-separated subset of: " + ", ".join(TARGET_NAMES))
    ap.add_argument("--case-timeout", type=float, default=5.0, help="seconds before a hang")
    ap.add_argument(
        "--trace-every",
        type=int,
        metavar="N",
        help="tracemalloc on for every Nth case only (default 1: throughout, exact; 0: never)",
    )
    ap.add_argument("--replay", metavar="TARGET:CASE", help="run one case again, verbosely")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.seed, args.replay)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import code_version, command_line, emit, machine_info

    frames = args.frames or (20_000 if args.quick else 1_000_000)
    trace_every = args.trace_every if args.trace_every is not None else (20 if args.quick else 1)
    names = args.targets.split(",") if args.targets else None
    machine = machine_info()  # the commit under test, as the run starts
    report = run_fuzz(frames, args.seed, names, args.case_timeout, trace_every)
    result = {
        "benchmark": "fuzz",
        "command": command_line(),
        "machine": {
            **machine,
            "loadavg_at_end": list(os.getloadavg()),
            "commit_at_end": code_version(),
        },
        "trace_every": trace_every,
        "frames_fed": sum(t.frames for t in report.targets),
        **report.to_json(),
    }
    emit(result, _tables(report, trace_every), args.json)
    return 1 if report.failures else 0


TARGET_NAMES = (
    "decoder",
    "swim",
    "membership",
    "node",
    "tcp",
    "memnet",
    "exchange",
    "client",
    "peer",
    "secure",
)

if __name__ == "__main__":
    sys.exit(main())
