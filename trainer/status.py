"""Ask a running peer what it sees (``gossip-train members``)."""

from __future__ import annotations

import asyncio
from typing import Any

from p2p.framing import Frame, MsgType
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring
from p2p.transport import TcpTransport, TransportError, parse_addr


async def request(
    addr: str,
    msg_type: int,
    header: dict[str, Any],
    cluster: str = "gossip-train",
    timeout: float = 3.0,
    what: str = "request",
    keyring: Keyring | None = None,
) -> Frame:
    """One request to a running peer over a fresh handshaken connection; its reply frame."""
    parse_addr(addr)
    config = NodeConfig(cluster=cluster, keyring=keyring)
    node = Node(TcpTransport(), f"gossip-train-{what}", config)
    try:
        conn = await node.open(addr, timeout)
        try:
            async with asyncio.timeout(timeout):
                await conn.send(msg_type, header)
                return await conn.recv()
        except TimeoutError:
            raise TransportError(f"{addr}: no {what} answer within {timeout:.1f} s") from None
        finally:
            conn.close()
    finally:
        await node.close()


async def fetch_status(
    addr: str,
    cluster: str = "gossip-train",
    timeout: float = 3.0,
    keyring: Keyring | None = None,
) -> dict:
    reply = await request(addr, MsgType.STATUS_REQ, {}, cluster, timeout, "status", keyring)
    if reply.type != MsgType.STATUS:
        raise TransportError(f"{addr}: unexpected reply type {reply.type}")
    return reply.header


def format_members(status: dict[str, Any]) -> str:
    rows = [("NAME", "ADDRESS", "STATE", "INCARNATION")]
    for m in sorted(status.get("members", []), key=lambda m: str(m.get("name"))):
        rows.append(
            (str(m.get("name")), str(m.get("addr")), str(m.get("state")), str(m.get("incarnation")))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"peer {status.get('name')} ({status.get('status')}, step {status.get('step')}/"
        f"{status.get('total_steps')}, {status.get('exchanges')} exchanges) sees:"
    ]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
