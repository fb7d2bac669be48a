"""Networks for multi-host and chaos runs, with the same faults in two modes.

``NamespaceNet`` (mode "netns", needs root): every peer is a separate host in its own network
namespace with its own IP address, joined to the others by a veth pair and one bridge.
A partition takes the cut-off groups' links down and brings them up on bridges of their own;
a slow link is a ``tc tbf`` bandwidth cap on both ends of one peer's veth pair.

``ProxyNet`` (mode "proxy", no privileges): every peer advertises the front address of a
TCP proxy inside this process, so all traffic to a peer passes through its proxy. The proxy
learns the caller from the HELLO frame that opens every connection; a partition freezes the
connections that cross the cut (no byte moves until the heal, like a dead link), and a slow
link is a token bucket on the peer's bytes in each direction.

Everything a run creates is named with the prefix ``gt-<pid>-`` so that cleanup finds it:
``close()`` removes it (call it from ``finally``; ``guard()`` adds atexit and SIGTERM), and
``cleanup_stale()`` removes what runs killed with SIGKILL left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREFIX_ROOT = "gt-"
# Names look like gt-<pid>-p3 (namespace), gt-<pid>-h3 (host end of peer 3's veth),
# gt-<pid>-br (the bridge), gt-<pid>-g1 (the bridge of partition group 1).
NAME_RE = re.compile(r"^gt-(\d+)-([a-z]+\d*)$")
# Per-namespace files that `ip netns exec` mounts over /etc (here: hosts).
ETC_NETNS = Path("/etc/netns")
# Linux interface names hold at most 15 characters: gt-4194303-h999 is 15.
MAX_IFNAME = 15
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$")
RATE_UNITS = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}


class NetError(OSError):
    """The network for a run could not be made or changed; one line for the user."""


def parse_rate(rate: str) -> float:
    """A tc rate ("10mbit", "500kbit", "2mbps") in bytes per second; ValueError otherwise."""
    m = RATE_RE.match(rate.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"bad rate {rate!r}: expected a number and a unit like 10mbit or 2mbps")
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


# tbf's bucket: this many seconds of the rate, and at least MIN_BURST bytes. The kernel
# refills it from an hrtimer, so it need not hold a whole timer tick, but it must hold a few
# full-size frames (a smaller one drops every packet larger than it) and a GSO packet that
# does not fit is split into segments first. 20 ms of the rate lets a link send short bursts
# at line speed (25 kB at 10mbit) without changing its average rate.
BURST_SECONDS = 0.02
MIN_BURST = 16 * 1024


def tbf_args(rate: str, latency: str) -> list[str]:
    """``tc qdisc replace dev DEV`` arguments of a tbf cap: ``root tbf rate R burst B latency L``.

    ``latency`` bounds how long a packet waits for tokens: the queue holds rate x latency
    bytes plus the bucket, and a packet beyond that is dropped, which TCP takes as
    congestion and slows down for, as it does on a thin link. ValueError for a bad rate.
    """
    burst = max(MIN_BURST, int(parse_rate(rate) * BURST_SECONDS))
    return ["root", "tbf", "rate", rate, "burst", str(burst), "latency", latency]


def state_dir() -> Path:
    """Where runs record who owns which names (root: /run; otherwise the temp folder)."""
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    path = base / "gossip-train"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (survives pid reuse checks); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class FaultNet(ABC):
    """The network faults a chaos driver can inject, whatever the mode."""

    mode: str

    @abstractmethod
    def partition(self, groups: list[list[int]]) -> None:
        """Cut the peers into groups (peer indices); each group only reaches itself."""

    @abstractmethod
    def heal(self) -> None:
        """Undo any partition."""

    @abstractmethod
    def cap(self, index: int, rate: str) -> None:
        """Limit peer ``index``'s link to ``rate`` in each direction."""

    @abstractmethod
    def uncap(self, index: int) -> None:
        """Remove the bandwidth limit of peer ``index``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The mode and what identifies this network (for peers.json and summary.json)."""


# -- network namespaces ---------------------------------------------------------------------


def run_cmd(*argv: str, check: bool = True, timeout: float = 10.0) -> str:
    """Run one ``ip``/``tc`` command; a failure raises NetError with its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetError(f"{' '.join(argv)}: {exc}") from None
    if check and proc.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def netns_available() -> tuple[bool, str]:
    """Can this process create network namespaces and veth links? (ok, reason if not)."""
    if os.geteuid() != 0:
        return False, f"network namespaces need root (running as uid {os.geteuid()})"
    probe = f"{PREFIX_ROOT}{os.getpid()}-probe"
    try:
        run_cmd("ip", "netns", "add", probe)
        run_cmd("ip", "netns", "del", probe)
        link = f"{PREFIX_ROOT}{os.getpid()}-t0"
        run_cmd("ip", "link", "add", link, "type", "veth", "peer", "name", link + "x")
        run_cmd("ip", "link", "del", link)
    except NetError as exc:
        run_cmd("ip", "netns", "del", probe, check=False)
        return False, f"cannot create network namespaces here: {exc}"
    return True, ""


@dataclass(frozen=True)
class NetnsConfig:
    # Three octets of the run's /24 ("10.201.7"); None picks the first free 10.201.X.0/24.
    subnet: str | None = None
    # Address of the host side of the bridge within the /24 (the launcher reaches peers
    # through it for control commands); peers get .1, .2, ... in index order.
    host_octet: int = 254
    # tbf latency: how long a packet may wait in the shaper queue before it is dropped.
    # TCP sees a drop as congestion and slows down, which is what a thin link does.
    tbf_latency: str = "200ms"
    # "KEY=VALUE" kernel settings applied inside every peer's namespace, as each host's own
    # (net.* settings are per namespace): e.g. net.ipv4.tcp_retries2=5 to abort connections
    # on a dead link after ~12 s instead of ~15 min. Empty: the kernel's defaults.
    sysctls: tuple[str, ...] = ()


@dataclass
class NamespaceNet(FaultNet):
    """N namespaces on one bridge. ``create()``, then use, then ``close()`` (idempotent)."""

    n: int
    config: NetnsConfig = field(default_factory=NetnsConfig)
    owner: int = field(default_factory=os.getpid)
    mode: str = "netns"
    subnet: str = ""
    _made: bool = False
    _closed: bool = False

    @property
    def prefix(self) -> str:
        return f"{PREFIX_ROOT}{self.owner}-"

    def ns(self, i: int) -> str:
        return f"{self.prefix}p{i}"

    def host_link(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def bridge(self, group: int = 0) -> str:
        return f"{self.prefix}br" if group == 0 else f"{self.prefix}g{group}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.{self.config.host_octet}"

    def exec_argv(self, i: int) -> list[str]:
        """Prefix that runs a command inside peer ``i``'s namespace (``ip`` execs it)."""
        return ["ip", "netns", "exec", self.ns(i)]

    def create(self) -> NamespaceNet:
        if not 1 <= self.n < self.config.host_octet:
            raise NetError(f"{self.n} peers do not fit one /24 with the host at .254")
        if len(self.host_link(self.n - 1)) > MAX_IFNAME:
            raise NetError(f"interface name {self.host_link(self.n - 1)!r} is too long")
        cleanup_stale()
        with _lock():
            self.subnet = self.config.subnet or _free_subnet()
            self._record()
            self._made = True
            try:
                self._make_bridge(0, self.host_ip)
                for i in range(self.n):
                    self._make_host(i)
                self._write_hosts()
            except BaseException:
                self.close()
                raise
        log.info("%d namespaces on %s.0/24, bridge %s", self.n, self.subnet, self.bridge())
        return self

    def _record(self) -> None:
        state = {"pid": self.owner, "start": _start_time(self.owner), "subnet": self.subnet}
        (state_dir() / f"{self.prefix}owner.json").write_text(json.dumps(state))

    def _make_bridge(self, group: int, addr: str | None) -> None:
        br = self.bridge(group)
        run_cmd("ip", "link", "add", br, "type", "bridge")
        if addr:
            run_cmd("ip", "addr", "add", f"{addr}/24", "dev", br)
        run_cmd("ip", "link", "set", br, "up")

    def _make_host(self, i: int) -> None:
        ns, host, inner = self.ns(i), self.host_link(i), f"{self.prefix}n{i}"
        run_cmd("ip", "netns", "add", ns)
        run_cmd("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
        run_cmd("ip", "link", "set", inner, "netns", ns)
        run_cmd("ip", "link", "set", host, "master", self.bridge(), "up")
        run_cmd("ip", "-n", ns, "link", "set", inner, "name", "eth0")
        run_cmd("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
        run_cmd("ip", "-n", ns, "link", "set", "eth0", "up")
        run_cmd("ip", "-n", ns, "link", "set", "lo", "up")
        run_cmd("ip", "-n", ns, "route", "add", "default", "via", self.host_ip)
        for setting in self.config.sysctls:
            run_cmd("ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting)

    def _write_hosts(self) -> None:
        """/etc/netns/<ns>/hosts (``ip netns exec`` mounts it over /etc/hosts): the host's
        own entries and every peer of the run by its namespace name. Without it a reverse
        lookup of a peer's address (torch's TCPStore makes one per connection) asks the
        host's DNS server, which a namespace cannot reach: 10 s until it gives up."""
        try:
            base = Path("/etc/hosts").read_text()
        except OSError:
            base = "127.0.0.1 localhost\n"
        names = [(self.ip(j), self.ns(j)) for j in range(self.n)]
        names.append((self.host_ip, f"{self.prefix}host"))
        # A dual-stack server (TCPStore's) sees IPv4 callers as ::ffff:a.b.c.d.
        lines = [f"{ip} {name}" for ip, name in names] + [f"::ffff:{ip} {n}" for ip, n in names]
        text = base.rstrip("\n") + f"\n# gossip-train run {self.owner}\n" + "\n".join(lines) + "\n"
        for i in range(self.n):
            folder = ETC_NETNS / self.ns(i)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(text)

    # -- faults ------------------------------------------------------------------------------
    def partition(self, groups: list[list[int]]) -> None:
        """Group 0 stays on the main bridge (with the host); every other group's links go
        down, move to a bridge of that group's own, and come back up there."""
        self.heal()
        existing = run_cmd("ip", "-o", "link", "show", "type", "bridge")
        for g, members in enumerate(groups[1:], start=1):
            # Another process (a standalone `gossip-train chaos`) may have made it before.
            if f" {self.bridge(g)}:" not in existing:
                self._make_bridge(g, None)
            for i in members:
                self._move(i, g)

    def heal(self) -> None:
        for i in range(self.n):
            self._move(i, 0)

    def _move(self, i: int, group: int) -> None:
        host = self.host_link(i)
        info = run_cmd("ip", "-o", "link", "show", host)
        if f"master {self.bridge(group)} " in info:
            return
        run_cmd("ip", "link", "set", host, "down")
        run_cmd("ip", "link", "set", host, "master", self.bridge(group))
        run_cmd("ip", "link", "set", host, "up")

    def link_down(self, i: int) -> None:
        run_cmd("ip", "link", "set", self.host_link(i), "down")

    def link_up(self, i: int) -> None:
        run_cmd("ip", "link", "set", self.host_link(i), "up")

    def cap(self, index: int, rate: str) -> None:
        """A tbf on the egress of both ends of peer ``index``'s veth pair: inside its
        namespace (what it sends) and on the host end (what it receives), so the link is
        capped at ``rate`` in each direction. ``uncap`` (or ``close``) removes it."""
        tbf = tbf_args(rate, self.config.tbf_latency)
        run_cmd("tc", "qdisc", "replace", "dev", self.host_link(index), *tbf)
        inside = ["ip", "netns", "exec", self.ns(index)]
        run_cmd(*inside, "tc", "qdisc", "replace", "dev", "eth0", *tbf)

    def uncap(self, index: int) -> None:
        run_cmd("tc", "qdisc", "del", "dev", self.host_link(index), "root", check=False)
        inside = ["ip", "netns", "exec", self.ns(index)]
        run_cmd(*inside, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def link_bytes(self, index: int) -> tuple[int, int] | None:
        """(sent, received) bytes of peer ``index``'s link so far: the kernel's counters of
        the host end of its veth pair (what the host end receives, the peer sent), so they
        can be read from the root namespace while the peer runs. Every frame counts (IP and
        TCP headers, ARP); a GSO packet counts its headers once. None once the link is gone."""
        stats = Path("/sys/class/net") / self.host_link(index) / "statistics"
        try:
            rx = int((stats / "rx_bytes").read_text())
            tx = int((stats / "tx_bytes").read_text())
        except (OSError, ValueError):
            return None
        return rx, tx

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Kill whatever still runs in the namespaces, delete them, the links and bridges."""
        if self._closed or not self._made:
            return
        self._closed = True
        remove_owned(self.owner)

    def describe(self) -> dict[str, Any]:
        """What a standalone ``gossip-train chaos`` needs to act on this network."""
        return {"mode": self.mode, "owner": self.owner, "n": self.n, "subnet": self.subnet}

    @classmethod
    def attach(cls, info: dict[str, Any]) -> NamespaceNet:
        """The network of another (running) process, from ``describe()``; never closed here."""
        net = cls(int(info["n"]), owner=int(info["owner"]), subnet=str(info["subnet"]))
        net._closed = True
        return net

    def guard(self) -> None:
        """Also remove everything at interpreter exit and on SIGTERM (not only in finally)."""
        atexit.register(self.close)
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(sig: int, frame: FrameType | None) -> None:
            self.close()
            if callable(previous):
                previous(sig, frame)
            raise SystemExit(128 + sig)

        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, on_term)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise subnet choice and creation between runs started at the same moment."""
    with open(state_dir() / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_subnet() -> str:
    used = set(re.findall(r"inet (10\.201\.\d+)\.\d+/", run_cmd("ip", "-4", "-o", "addr", "show")))
    for x in range(256):
        if f"10.201.{x}" not in used:
            return f"10.201.{x}"
    raise NetError("no free 10.201.X.0/24 subnet left for the run's bridge")


def owned_names() -> dict[int, dict[str, list[str]]]:
    """Every namespace, link and /etc/netns folder named by the gt-<pid>- scheme, by owner
    pid ("ns", "links" and, where there are any, "etc")."""
    out: dict[int, dict[str, list[str]]] = {}
    for line in run_cmd("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        m = NAME_RE.match(name)
        if m:
            out.setdefault(int(m.group(1)), {"ns": [], "links": []})["ns"].append(name)
    for line in run_cmd("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        m = NAME_RE.match(name)
        if m:
            out.setdefault(int(m.group(1)), {"ns": [], "links": []})["links"].append(name)
    with contextlib.suppress(OSError):
        for entry in ETC_NETNS.iterdir():
            m = NAME_RE.match(entry.name)
            if m:
                out.setdefault(int(m.group(1)), {"ns": [], "links": []})
                out[int(m.group(1))].setdefault("etc", []).append(entry.name)
    return out


def _owner_alive(pid: int) -> bool:
    start = _start_time(pid)
    if start is None:
        return False
    record = state_dir() / f"{PREFIX_ROOT}{pid}-owner.json"
    try:
        recorded = json.loads(record.read_text()).get("start")
    except (OSError, ValueError):
        return True  # no record: cannot tell a reused pid, so leave it alone
    return recorded == start


def remove_owned(pid: int) -> list[str]:
    """Remove every namespace (killing what runs inside), link and bridge of owner ``pid``."""
    names = owned_names().get(pid, {"ns": [], "links": []})
    for ns in names["ns"]:
        _kill_inside(ns)
        run_cmd("ip", "netns", "del", ns, check=False)
    # Deleting a namespace deletes its veth end, and the kernel drops the pair a moment
    # later; delete the host ends explicitly so nothing is left when we return.
    for link in sorted(names["links"], key=lambda x: x.endswith("br")):
        run_cmd("ip", "link", "del", link, check=False)
    for folder in names.get("etc", []):
        shutil.rmtree(ETC_NETNS / folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        (state_dir() / f"{PREFIX_ROOT}{pid}-owner.json").unlink()
    removed = names["ns"] + names["links"]
    if removed:
        log.info("removed %s", " ".join(removed))
    return removed


def _kill_inside(ns: str) -> None:
    pids = [int(p) for p in run_cmd("ip", "netns", "pids", ns, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _start_time(p) is not None and not _zombie(p)]
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cleanup_stale() -> list[str]:
    """Remove what runs that no longer exist left behind (killed with SIGKILL, power loss)."""
    removed: list[str] = []
    if os.geteuid() != 0:
        return removed
    for pid in owned_names():
        if not _owner_alive(pid):
            removed += remove_owned(pid)
    return removed


# -- the fault-injecting TCP proxy ------------------------------------------------------------
