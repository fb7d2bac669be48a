"""A peer's index from a Kubernetes StatefulSet: ``--index auto``.

A StatefulSet names its pods ``NAME-0``, ``NAME-1``, ...; the ordinal is the peer's index,
so every pod runs the same command and a rescheduled pod keeps its partition (and, with a
volumeClaimTemplate, its checkpoints).
"""

from __future__ import annotations

import re
import socket

_ORDINAL = re.compile(r".+-(\d+)")


class OrdinalError(ValueError):
    """The hostname carries no usable StatefulSet ordinal."""


def ordinal(hostname: str, num_peers: int) -> int:
    """``trainer-3`` -> 3. The pod's hostname is its name (a short name, no domain)."""
    short = hostname.split(".", 1)[0]
    m = _ORDINAL.fullmatch(short)
    if m is None:
        raise OrdinalError(
            f"--index auto: hostname {hostname!r} has no StatefulSet ordinal (NAME-N)"
        )
    index = int(m.group(1))
    if not index < num_peers:
        raise OrdinalError(
            f"--index auto: ordinal {index} of {hostname!r} is not below --num-peers {num_peers}"
        )
    return index


def own_ordinal(num_peers: int) -> int:
    return ordinal(socket.gethostname(), num_peers)
