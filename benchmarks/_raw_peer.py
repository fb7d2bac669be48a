"""Raw-socket peer for the exchange benchmark: the ceiling that framing and asyncio are held to.

Plain blocking sockets, no framing, no event loop. It accepts one connection and then, per
round, receives ``--size`` float32 values with ``recv_into`` a preallocated buffer (and, in
``--duplex`` mode, sends as many back at the same time from a second thread), then answers
one ack byte. It exits when the connection or its stdin closes.

    python benchmarks/_raw_peer.py --size 1000000 [--duplex]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

from common import announce

ACK = b"k"
# Bound on the wait for the benchmark to connect and between rounds: a parent that died
# without closing our stdin must not leave this process behind.
IDLE_TIMEOUT = 600.0


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; raise ConnectionError on EOF."""
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-round")
        got += n


def serve(conn: socket.socket, nbytes: int, duplex: bool) -> int:
    """Answer rounds until the peer closes; return the number of rounds served."""
    inbox = memoryview(bytearray(nbytes))
    outbox = memoryview(bytearray(os.urandom(16)) * (nbytes // 16 + 1))[:nbytes]
    rounds = 0
    while True:
        first = conn.recv_into(inbox[:1])
        if first == 0:
            return rounds
        sender = None
        if duplex:
            sender = threading.Thread(target=conn.sendall, args=(outbox,), daemon=True)
            sender.start()
        recv_exact(conn, inbox[1:])
        if sender is not None:
            sender.join(IDLE_TIMEOUT)
        conn.sendall(ACK)
        rounds += 1


def exit_on_stdin_eof() -> None:
    sys.stdin.read()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, required=True, help="float32 values per round")
    parser.add_argument("--duplex", action="store_true", help="send as much back per round")
    args = parser.parse_args()
    threading.Thread(target=exit_on_stdin_eof, daemon=True).start()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(IDLE_TIMEOUT)
        host, port = server.getsockname()[:2]
        announce(f"{host}:{port}")
        conn, _ = server.accept()
    with conn:
        conn.settimeout(IDLE_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        serve(conn, 4 * args.size, args.duplex)


if __name__ == "__main__":
    main()
