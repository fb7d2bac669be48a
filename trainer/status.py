"""Ask a running peer what it sees (``gossip-train members``)."""

from __future__ import annotations

import asyncio
from typing import Any

from p2p.framing import MsgType
from p2p.node import Node, NodeConfig
from p2p.transport import TcpTransport, TransportError, parse_addr


async def fetch_status(addr: str, cluster: str = "gossip-train", timeout: float = 3.0) -> dict:
    parse_addr(addr)
    node = Node(TcpTransport(), "gossip-train-cli", NodeConfig(cluster=cluster))
    try:
        conn = await node.open(addr, timeout)
        try:
            async with asyncio.timeout(timeout):
                await conn.send(MsgType.STATUS_REQ, {})
                reply = await conn.recv()
        except TimeoutError:
            raise TransportError(f"{addr}: no status answer within {timeout:.1f} s") from None
        finally:
            conn.close()
    finally:
        await node.close()
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
