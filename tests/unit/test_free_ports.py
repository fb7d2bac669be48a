"""The ports a local run gives its peers: free, distinct, and outside the kernel's ephemeral
range, which outgoing connections and the proxy's fronts take theirs from."""

from __future__ import annotations

import socket

import trainer.launch.local as local


def test_peer_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    low = local.ephemeral_low()
    ports = local.free_ports(8)
    assert len(set(ports)) == 8
    assert all(local.PORT_FLOOR <= p < low for p in ports), (ports, low)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free now


def test_a_port_in_use_is_never_handed_out(monkeypatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", local.PORT_FLOOR))
    taken.listen()
    try:
        # Only 100 candidates, one of them taken: the others are drawn, never that one.
        monkeypatch.setattr(local, "ephemeral_low", lambda: local.PORT_FLOOR + 100)
        for _ in range(20):
            assert local.PORT_FLOOR not in local.free_ports(1)
    finally:
        taken.close()


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch) -> None:
    kernels = local.ephemeral_low()
    monkeypatch.setattr(local, "ephemeral_low", lambda: local.PORT_FLOOR + 10)
    ports = local.free_ports(3)
    assert len(set(ports)) == 3 and all(p >= kernels for p in ports)  # bound to port 0
