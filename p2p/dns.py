"""Seeds named by DNS: ``dns:NAME:PORT`` stands for every A/AAAA record of NAME.

A Kubernetes headless Service (or any name with several records) then works as a seed
list that follows the swarm: the agent resolves it when it joins, and again while it has
no live neighbour, so peers that start alone, or outlive every neighbour they knew, find
the others under their new addresses. The loop's own ``getaddrinfo`` (the system resolver:
/etc/hosts, then the servers of /etc/resolv.conf), with a timeout; no new dependency.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

PREFIX = "dns:"
# Seconds one resolution may take: the system resolver's own retries can run far longer.
RESOLVE_TIMEOUT = 5.0


class DnsError(OSError):
    """A ``dns:`` seed that is malformed or whose name does not resolve."""


def is_dns(seed: str) -> bool:
    return seed.startswith(PREFIX)


def parse(seed: str) -> tuple[str, int]:
    """``dns:NAME:PORT`` -> (NAME, PORT), with a one-line error for anything else."""
    name, sep, port = seed[len(PREFIX) :].rpartition(":")
    if not is_dns(seed) or not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad seed {seed!r}: expected dns:NAME:PORT")
    return name, int(port)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


async def resolve(seed: str, timeout: float = RESOLVE_TIMEOUT) -> list[str]:
    """Every address of a ``dns:`` seed as ``HOST:PORT``, in the resolver's order, once each.
    Raises DnsError when the name does not resolve within ``timeout``."""
    name, port = parse(seed)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise DnsError(f"{seed}: no answer for {name} within {timeout:g} s") from None
    except OSError as exc:  # socket.gaierror: NXDOMAIN, no server, ...
        raise DnsError(f"{seed}: {name} does not resolve ({exc.strerror or exc})") from None
    found = [_addr(str(info[4][0]).split("%")[0], port) for info in infos]
    return list(dict.fromkeys(found))


async def expand(seeds: Iterable[str], timeout: float = RESOLVE_TIMEOUT) -> list[str]:
    """``seeds`` with every ``dns:`` entry replaced by its addresses. Names that do not
    resolve are left out; if every seed is such a name, the first one's DnsError is raised."""
    out: list[str] = []
    errors: list[DnsError] = []
    plain = 0
    for seed in seeds:
        if not is_dns(seed):
            out.append(seed)
            plain += 1
            continue
        try:
            out += await resolve(seed, timeout)
        except DnsError as exc:
            errors.append(exc)
    if errors and not out and not plain:
        raise errors[0]
    return list(dict.fromkeys(out))
