"""A peer's control handler (``--allow-control``) on good and malformed commands."""

from __future__ import annotations

from typing import Any

import msgpack

from p2p.framing import Frame, MsgType
from p2p.memnet import MemoryNetwork
from trainer.config import PeerConfig
from trainer.peer import Peer


class Trainer:
    slowdown = 0.0


class Conn:
    def __init__(self) -> None:
        self.sent: list[tuple[int, dict[str, Any]]] = []

    async def send(self, msg_type: int, header: dict[str, Any] | None = None) -> None:
        self.sent.append((msg_type, header or {}))


def peer(trainer: Trainer) -> Peer:
    cfg = PeerConfig(name="p", allow_control=True)
    return Peer(cfg, trainer, MemoryNetwork().transport())


async def test_slowdown_is_applied_and_echoed() -> None:
    t, conn = Trainer(), Conn()
    await peer(t)._on_control(conn, Frame(MsgType.CONTROL, {"op": "slowdown", "factor": 4}))
    assert t.slowdown == 3.0
    assert conn.sent == [(MsgType.CONTROL_OK, {"op": "slowdown", "factor": 4})]


async def test_a_bad_command_is_refused_with_a_short_reason() -> None:
    # Found by benchmarks/fuzz.py: the reason held repr(header), which raises RecursionError
    # for a value nested ~1000 deep, and is up to 4x the header's size (escaped control
    # characters): an ERROR frame bigger than the peer's decoder accepts.
    deep = msgpack.unpackb(b"\x91" * 1000 + b"\x80")
    t, conn = Trainer(), Conn()
    p = peer(t)
    for header in ({"op": "slowdown", "factor": deep}, {"op": "\x00" * 1_000_000, "factor": 2}):
        await p._on_control(conn, Frame(MsgType.CONTROL, header))
    assert [m for m, _ in conn.sent] == [MsgType.ERROR, MsgType.ERROR]
    assert all(h["reason"].startswith("bad control command {") for _, h in conn.sent)
    assert all(len(h["reason"]) < 300 for _, h in conn.sent)
    assert t.slowdown == 0.0
