"""Failure injection: scenarios, seeded random chaos, and the driver that applies them.

A scenario is a small TOML file (or repeated ``--fault`` / ``--random`` flags) that gives each
fault a time in seconds. Time 0 is the moment every peer has started training (under
``gossip-train local``) or the moment ``gossip-train chaos`` starts (for peers already running).

    seed = 7                        # for [[random]] entries; --chaos-seed overrides it

    [[fault]]
    at = 10
    kind = "partition"
    groups = [[0, 1], [2, 3]]       # peer indices or names; unlisted peers form one more group
    duration = 30                   # heal after 30 s (without it: a later kind = "heal")

    [[random]]                      # kill a random peer every 20 +- 5 s, from t = 20 to 180
    kind = "kill"
    every = 20
    jitter = 5
    until = 180

``plan()`` turns a scenario into a flat, sorted list of actions, drawing every random choice
(times and peers) from one ``random.Random(seed)``: the same seed gives the same actions,
which is what "replays exactly" means. ``Driver`` then applies them to a ``Target``: the
launcher's children (``trainer.local``) or processes found in a run's ``peers.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import signal
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2p.framing import MsgType
from p2p.transport import TransportError, parse_addr

from .netns import FaultNet, NamespaceNet, NetError, parse_rate

log = logging.getLogger(__name__)

# Parameters each fault kind takes, beyond ``at`` and ``kind`` ("?" marks optional ones).
KINDS: dict[str, tuple[str, ...]] = {
    "kill": ("peer",),
    "restart": ("peer",),
    "pause": ("peer", "duration?"),
    "resume": ("peer",),
    "partition": ("groups", "duration?"),
    "heal": (),
    "slow-link": ("peer", "rate", "duration?"),
    "unslow-link": ("peer",),
    "slow-peer": ("peer", "factor", "duration?"),
    "unslow-peer": ("peer",),
}
# What ends a fault that has a duration.
UNDO = {
    "pause": "resume",
    "partition": "heal",
    "slow-link": "unslow-link",
    "slow-peer": "unslow-peer",
}
NETWORK_KINDS = {"partition", "heal", "slow-link", "unslow-link"}
RANDOM_KEYS = {"kind", "every", "jitter", "start", "until", "count", "peers"}
# A random schedule longer than this many faults is almost surely a typo in every/until.
MAX_RANDOM_FAULTS = 10_000


class ScenarioError(ValueError):
    """A scenario problem, with the file and line (or flag) it comes from."""


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    params: dict[str, Any]
    where: str  # "FILE:LINE" or "--fault #N", for error messages and the report


@dataclass(frozen=True)
class RandomFault:
    kind: str
    every: float  # mean seconds between faults
    jitter: float  # each gap is every +- jitter, uniformly
    start: float  # earliest time of the first fault
    until: float  # no fault after this time
    count: int  # at most this many faults
    peers: tuple[Any, ...]  # candidates (indices or names); empty = every peer
    params: dict[str, Any]  # parameters of each fault (duration, rate, factor)
    where: str


@dataclass(frozen=True)
class Scenario:
    seed: int = 0
    faults: tuple[Fault, ...] = ()
    randoms: tuple[RandomFault, ...] = ()

    def __add__(self, other: Scenario) -> Scenario:
        seed = other.seed or self.seed
        return Scenario(seed, self.faults + other.faults, self.randoms + other.randoms)

    @property
    def empty(self) -> bool:
        return not self.faults and not self.randoms

    @property
    def network(self) -> bool:
        """Does it need network faults (namespaces or the proxy)?"""
        kinds = [f.kind for f in self.faults] + [r.kind for r in self.randoms]
        return any(k in NETWORK_KINDS for k in kinds)


@dataclass(frozen=True)
class Action:
    """One thing the driver does at one time; a fault with a duration becomes two actions."""

    at: float
    kind: str
    peers: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    rate: str | None = None
    factor: float | None = None
    source: str = ""  # where it came from: "FILE:LINE", "--fault #2", "random #1 (FILE:9)"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": round(self.at, 3), "fault": self.kind}
        if self.peers:
            out["peers"] = list(self.peers)
        if self.groups:
            out["groups"] = [list(g) for g in self.groups]
        if self.rate is not None:
            out["rate"] = self.rate
        if self.factor is not None:
            out["factor"] = self.factor
        out["source"] = self.source
        return out


# -- parsing ---------------------------------------------------------------------------------


class _Lines:
    """Line numbers of tables and keys in a TOML text (tomllib does not report them)."""

    HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str | None, int], tuple[int, dict[str, int]]] = {}
        seen: dict[str | None, int] = {None: 0}
        current: tuple[str | None, int] = (None, 0)
        self.tables[current] = (1, {})
        for n, line in enumerate(text.splitlines(), start=1):
            header = self.HEADER.match(line)
            if header:
                name = header.group(1)
                index = seen.get(name, -1) + 1
                seen[name] = index
                current = (name, index)
                self.tables[current] = (n, {})
                continue
            key = self.KEY.match(line)
            if key:
                self.tables[current][1].setdefault(key.group(1), n)

    def line(self, table: str | None, index: int, key: str | None = None) -> int:
        start, keys = self.tables.get((table, index), (1, {}))
        return keys.get(key, start) if key else start


def load_scenario(path: str | Path) -> Scenario:
    """A scenario from a TOML file; every error names the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScenarioError(f"scenario {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        msg = str(exc).split(" (at line")[0]
        where = f"{p}:{m.group(1)}:{m.group(2)}" if m else str(p)
        raise ScenarioError(f"{where}: {msg}") from None
    lines = _Lines(text)
    unknown = set(data) - {"seed", "fault", "random"}
    if unknown:
        key = sorted(unknown)[0]
        raise ScenarioError(
            f"{p}:{lines.line(None, 0, key)}: unknown key {key!r} "
            "(a scenario has seed, [[fault]] and [[random]])"
        )
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError(f"{p}:{lines.line(None, 0, 'seed')}: seed must be an integer")
    faults, randoms = [], []
    for i, entry in enumerate(_tables(data, "fault", p, lines)):
        faults.append(_fault(entry, _in_file(p, lines, "fault", i)))
    for i, entry in enumerate(_tables(data, "random", p, lines)):
        randoms.append(_random(entry, _in_file(p, lines, "random", i)))
    return Scenario(seed, tuple(faults), tuple(randoms))


def _tables(data: dict[str, Any], key: str, p: Path, lines: _Lines) -> list[dict[str, Any]]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ScenarioError(f"{p}:{lines.line(None, 0, key)}: write each {key} as [[{key}]]")
    return entries


Where = Callable[[str | None], str]


def _in_file(p: Path, lines: _Lines, table: str, index: int) -> Where:
    """FILE:LINE of a key of the index-th [[table]] (the table's header for None)."""

    def where(key: str | None) -> str:
        return f"{p}:{lines.line(table, index, key)}"

    return where


def _at_flag(text: str) -> Where:
    def where(key: str | None) -> str:
        return text

    return where


def _fault(entry: dict[str, Any], where: Where) -> Fault:
    kind = _kind(entry, where)
    allowed = {"at", "kind"} | {k.rstrip("?") for k in KINDS[kind]}
    _no_unknown(entry, allowed, kind, where)
    if "at" not in entry:
        raise ScenarioError(f"{where(None)}: {kind} fault needs 'at' (seconds from the start)")
    at = _number(entry, "at", where, minimum=0.0)
    params = _params(entry, kind, where)
    return Fault(at, kind, params, where(None))


def _random(entry: dict[str, Any], where: Where) -> RandomFault:
    kind = _kind(entry, where)
    if kind in ("resume", "heal", "unslow-link", "unslow-peer"):
        raise ScenarioError(f"{where('kind')}: random {kind!r} makes no sense; use durations")
    if kind in UNDO and "duration" not in entry:
        raise ScenarioError(f"{where(None)}: random {kind} needs a duration (seconds)")
    allowed = RANDOM_KEYS | {k.rstrip("?") for k in KINDS[kind]}
    allowed -= {"peer", "groups"}  # drawn at random
    _no_unknown(entry, allowed, kind, where)
    for key in ("every",):
        if key not in entry:
            raise ScenarioError(f"{where(None)}: random {kind} needs {key!r} (seconds)")
    every = _number(entry, "every", where, minimum=1e-3)
    jitter = _number(entry, "jitter", where, minimum=0.0) if "jitter" in entry else 0.0
    if jitter >= every:
        raise ScenarioError(f"{where('jitter')}: jitter must be smaller than every ({every})")
    if "until" not in entry and "count" not in entry:
        raise ScenarioError(f"{where(None)}: random {kind} needs 'until' or 'count' to end")
    until = _number(entry, "until", where, minimum=0.0) if "until" in entry else math.inf
    count = int(_number(entry, "count", where, minimum=1)) if "count" in entry else 0
    start = _number(entry, "start", where, minimum=0.0) if "start" in entry else every
    peers = entry.get("peers", [])
    if not isinstance(peers, list) or not peers and "peers" in entry:
        raise ScenarioError(f"{where('peers')}: peers must be a non-empty list")
    params = _params({**entry, "peer": 0, "groups": [[0]]}, kind, where)
    params.pop("peer", None)
    params.pop("groups", None)
    count = count or MAX_RANDOM_FAULTS
    return RandomFault(kind, every, jitter, start, until, count, tuple(peers), params, where(None))


def _kind(entry: dict[str, Any], where: Where) -> str:
    kind = entry.get("kind")
    if kind is None:
        raise ScenarioError(f"{where(None)}: every entry needs 'kind' (one of: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise ScenarioError(
            f"{where('kind')}: unknown fault kind {kind!r} (one of: {', '.join(KINDS)})"
        )
    return str(kind)


def _no_unknown(entry: dict[str, Any], allowed: set[str], kind: str, where: Where) -> None:
    for key in entry:
        if key not in allowed:
            raise ScenarioError(
                f"{where(key)}: unknown key {key!r} for {kind} (allowed: "
                f"{', '.join(sorted(allowed))})"
            )


def _number(entry: dict[str, Any], key: str, where: Where, minimum: float) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{where(key)}: {key} must be a number, not {value!r}")
    if value < minimum:
        raise ScenarioError(f"{where(key)}: {key} must be at least {minimum}, not {value}")
    return float(value)


def _params(entry: dict[str, Any], kind: str, where: Where) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for spec in KINDS[kind]:
        key = spec.rstrip("?")
        if key not in entry:
            if not spec.endswith("?"):
                raise ScenarioError(f"{where(None)}: {kind} fault needs {key!r}")
            continue
        value = entry[key]
        if key == "duration":
            params[key] = _number(entry, key, where, minimum=1e-3)
        elif key == "factor":
            params[key] = _number(entry, key, where, minimum=1.0)
            if params[key] > 1000:
                raise ScenarioError(f"{where(key)}: factor must be at most 1000")
        elif key == "rate":
            try:
                parse_rate(str(value))
            except ValueError as exc:
                raise ScenarioError(f"{where(key)}: {exc}") from None
            params[key] = str(value)
        elif key == "peer":
            if not isinstance(value, int | str) or isinstance(value, bool):
                raise ScenarioError(f"{where(key)}: peer must be an index or a name")
            params[key] = value
        elif key == "groups":
            params[key] = _groups(value, where)
    return params


def _groups(value: Any, where: Where) -> list[list[Any]]:
    if isinstance(value, str):  # flag shorthand: "0,1/2,3"
        value = [[_index_or_name(p) for p in g.split(",") if p.strip()] for g in value.split("/")]
    ok = isinstance(value, list) and value and all(isinstance(g, list) and g for g in value)
    if not ok:
        raise ScenarioError(f"{where('groups')}: groups must be a list of peer lists")
    return value


def _index_or_name(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() else text


def _flag_value(text: str) -> Any:
    """A flag value: TOML syntax when it parses (numbers, lists, quoted strings), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _flag_entry(spec: str, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for token in spec.split():
        key, sep, value = token.partition("=")
        if not sep or not key or not value:
            raise ScenarioError(f"{where}: expected KEY=VALUE pairs, got {token!r} in {spec!r}")
        if key in ("for",):
            key = "duration"
        entry[key] = _flag_value(value)
    return entry


def scenario_from_flags(faults: Sequence[str], randoms: Sequence[str], seed: int = 0) -> Scenario:
    """``--fault 'at=10 kind=kill peer=2'`` and ``--random 'kind=kill every=20 jitter=5
    until=180'``: the same keys as the TOML file; ``for`` is short for ``duration``."""
    out_f, out_r = [], []
    for n, spec in enumerate(faults, start=1):
        where = f"--fault #{n} ({spec!r})"
        out_f.append(_fault(_flag_entry(spec, where), _at_flag(where)))
    for n, spec in enumerate(randoms, start=1):
        where = f"--random #{n} ({spec!r})"
        out_r.append(_random(_flag_entry(spec, where), _at_flag(where)))
    return Scenario(seed, tuple(out_f), tuple(out_r))


# -- planning ----------------------------------------------------------------------------------


def plan(scenario: Scenario, names: Sequence[str], seed: int | None = None) -> list[Action]:
    """Every action of a scenario for these peers, sorted by time.

    A fault aimed at a peer that does not exist is an error here, before anything starts.
    Random entries draw from ``random.Random(seed)`` in file order, so a seed replays.
    """
    rng = random.Random(scenario.seed if seed is None else seed)
    actions: list[Action] = []
    for f in scenario.faults:
        actions += _expand(f.at, f.kind, _resolve(f.params, names, f.where), f.params, f.where)
    for n, r in enumerate(scenario.randoms, start=1):
        pool = [_name(p, names, r.where) for p in r.peers] or list(names)
        if r.kind == "partition" and len(pool) < 2:
            raise ScenarioError(f"{r.where}: a random partition needs two or more peers")
        rest = tuple(p for p in names if p not in pool)
        t = r.start + rng.uniform(-r.jitter, r.jitter)
        for k in range(r.count):
            if t > r.until:
                break
            target = _draw(r.kind, pool, rest, rng)
            source = f"random #{n}.{k + 1} ({r.where})"
            actions += _expand(max(0.0, t), r.kind, target, r.params, source)
            t += r.every + rng.uniform(-r.jitter, r.jitter)
    return sorted(actions, key=lambda a: a.at)


def _draw(kind: str, pool: list[str], rest: tuple[str, ...], rng: random.Random) -> dict[str, Any]:
    """A random victim, or for a partition the candidates split in two random halves (the
    peers that are not candidates form a third group, as unlisted peers always do)."""
    if kind == "partition":
        shuffled = rng.sample(pool, len(pool))
        half = len(shuffled) // 2
        groups = (tuple(sorted(shuffled[:half])), tuple(sorted(shuffled[half:])))
        return {"groups": groups + ((rest,) if rest else ())}
    return {"peers": (rng.choice(pool),)}


def _resolve(params: dict[str, Any], names: Sequence[str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "peer" in params:
        out["peers"] = (_name(params["peer"], names, where),)
    if "groups" in params:
        groups = [tuple(_name(p, names, where) for p in g) for g in params["groups"]]
        flat = [p for g in groups for p in g]
        dup = {p for p in flat if flat.count(p) > 1}
        if dup:
            raise ScenarioError(f"{where}: {sorted(dup)[0]} is in more than one group")
        rest = tuple(p for p in names if p not in flat)
        out["groups"] = tuple(groups) + ((rest,) if rest else ())
        if len(out["groups"]) < 2:
            raise ScenarioError(f"{where}: a partition needs at least two groups")
    return out


def _name(ref: Any, names: Sequence[str], where: str) -> str:
    if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(names):
        return names[ref]
    if isinstance(ref, str) and ref in names:
        return ref
    raise ScenarioError(
        f"{where}: no peer {ref!r} in this run (peers: {', '.join(names)}; "
        f"or an index 0..{len(names) - 1})"
    )


def _expand(
    at: float, kind: str, target: dict[str, Any], params: dict[str, Any], source: str
) -> list[Action]:
    base = Action(
        at,
        kind,
        peers=target.get("peers", ()),
        groups=target.get("groups", ()),
        rate=params.get("rate"),
        factor=params.get("factor"),
        source=source,
    )
    out = [base]
    if kind in UNDO and "duration" in params:
        out.append(
            Action(at + params["duration"], UNDO[kind], peers=base.peers, source=source + " end")
        )
    return out


# -- applying faults ---------------------------------------------------------------------------


class Target(Protocol):
    """What the driver acts on. Each call returns extra fields for the fault's event."""

    names: list[str]
    net: FaultNet | None

    def kill(self, name: str) -> dict[str, Any]: ...

    def restart(self, name: str) -> dict[str, Any]: ...

    def signal(self, name: str, sig: int) -> dict[str, Any]: ...

    def control_addr(self, name: str) -> str: ...

    def record(self, event: dict[str, Any]) -> None: ...


async def send_control(
    addr: str, header: dict[str, Any], cluster: str = "gossip-train", timeout: float = 3.0
) -> dict[str, Any]:
    """One CONTROL command to a peer started with --allow-control; its CONTROL_OK header."""
    from .status import request

    reply = await request(addr, MsgType.CONTROL, header, cluster, timeout, "control")
    if reply.type != MsgType.CONTROL_OK:
        reason = reply.header.get("reason", f"reply type {reply.type}")
        raise TransportError(f"{addr} refused the control command: {reason}")
    return reply.header


@dataclass
class Driver:
    """Apply ``actions`` to ``target`` at their times after ``t0`` (time.monotonic)."""

    actions: list[Action]
    target: Target
    cluster: str = "gossip-train"
    done: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, t0: float | None = None) -> None:
        t0 = time.monotonic() if t0 is None else t0
        for action in self.actions:
            delay = t0 + action.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.apply(action, time.monotonic() - t0)

    async def apply(self, action: Action, elapsed: float) -> None:
        event: dict[str, Any] = {"kind": "fault", **action.to_json(), "elapsed": round(elapsed, 3)}
        try:
            event.update(await self._do(action))
        except (OSError, TransportError, NetError, ValueError, KeyError) as exc:
            event["kind"] = "fault_failed"
            event["error"] = str(exc)
            log.warning("fault %s at %.1f s failed: %s", action.kind, elapsed, exc)
        self.done.append(event)
        self.target.record(event)

    async def _do(self, a: Action) -> dict[str, Any]:
        t = self.target
        if a.kind in NETWORK_KINDS:
            return self._network(a)
        name = a.peers[0]
        if a.kind == "kill":
            return t.kill(name)
        if a.kind == "restart":
            return t.restart(name)
        if a.kind in ("pause", "resume"):
            return t.signal(name, signal.SIGSTOP if a.kind == "pause" else signal.SIGCONT)
        factor = a.factor if a.kind == "slow-peer" else 1.0
        reply = await send_control(
            t.control_addr(name), {"op": "slowdown", "factor": factor}, self.cluster
        )
        return {"reply": reply}

    def _network(self, a: Action) -> dict[str, Any]:
        net = self.target.net
        if net is None:
            raise NetError(f"{a.kind} needs a network that can inject faults (netns or proxy)")
        index = {n: i for i, n in enumerate(self.target.names)}
        if a.kind == "partition":
            net.partition([[index[p] for p in g] for g in a.groups])
        elif a.kind == "heal":
            net.heal()
        elif a.kind == "slow-link":
            assert a.rate is not None
            net.cap(index[a.peers[0]], a.rate)
        else:
            net.uncap(index[a.peers[0]])
        return {"mode": net.mode}


def check_target(actions: list[Action], net: FaultNet | None, where: str) -> None:
    """Refuse, before anything starts, network faults on a run that cannot take them."""
    needs = sorted({a.kind for a in actions if a.kind in NETWORK_KINDS})
    if needs and net is None:
        raise ScenarioError(
            f"{where}: {', '.join(needs)} need a network that injects faults: start the run "
            "with `gossip-train local --netns` (or inject from the launcher with --chaos)"
        )


# -- the standalone ``gossip-train chaos`` ------------------------------------------------------


@dataclass
class ProcessTarget:
    """Peers already running, found in RUN_DIR/peers.json and/or ``--peer NAME=PID@ADDR``."""

    peers: dict[str, dict[str, Any]]
    net: FaultNet | None = None
    events_file: Path | None = None
    run_dir: Path | None = None
    supervised: bool | None = None  # does something restart killed peers? None: unknown
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = list(self.peers)

    def _pid(self, name: str) -> int:
        self._refresh()
        pid = self.peers[name].get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"no process id known for {name}")
        return pid

    def _refresh(self) -> None:
        """A supervisor may have restarted a peer: take the pids from peers.json again."""
        if self.run_dir is None:
            return
        try:
            info = json.loads((self.run_dir / "peers.json").read_text())
        except (OSError, ValueError):
            return
        for p in info.get("peers", []):
            if p.get("name") in self.peers:
                self.peers[p["name"]]["pid"] = p.get("pid")

    def kill(self, name: str) -> dict[str, Any]:
        pid = self._pid(name)
        os.kill(pid, signal.SIGKILL)
        return {"pid": pid}

    def restart(self, name: str) -> dict[str, Any]:
        """SIGKILL; whoever supervises the peer (systemd, ``local --restart-failed``) starts
        it again from its checkpoint. This tool does not own the peer's command line."""
        out = self.kill(name)
        out["note"] = "killed; the peer's supervisor restarts it"
        return out

    def signal(self, name: str, sig: int) -> dict[str, Any]:
        pid = self._pid(name)
        os.kill(pid, sig)
        return {"pid": pid}

    def control_addr(self, name: str) -> str:
        p = self.peers[name]
        return str(p.get("control") or p["addr"])

    def record(self, event: dict[str, Any]) -> None:
        event = {"ts": time.time(), "by": "gossip-train chaos", **event}
        line = json.dumps(event)
        print(line, flush=True)
        if self.events_file is not None:
            with open(self.events_file, "a") as fh:
                fh.write(line + "\n")


def parse_peer_flag(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME=PID@HOST:PORT`` (PID may be empty for control-only peers)."""
    name, sep, rest = spec.partition("=")
    pid, at, addr = rest.partition("@")
    if not sep or not name or not at or not (pid.isdigit() or not pid):
        raise ScenarioError(f"--peer {spec!r}: expected NAME=PID@HOST:PORT")
    parse_addr(addr)
    return name, {"pid": int(pid) if pid else None, "addr": addr}


def target_from_args(run_dir: str | None, peer_flags: Sequence[str]) -> ProcessTarget:
    peers: dict[str, dict[str, Any]] = {}
    net: FaultNet | None = None
    events_file = None
    supervised = None
    rd = Path(run_dir) if run_dir else None
    if rd is not None:
        try:
            info = json.loads((rd / "peers.json").read_text())
        except FileNotFoundError:
            raise ScenarioError(f"{rd}/peers.json not found: is a run going on there?") from None
        except ValueError as exc:
            raise ScenarioError(f"{rd}/peers.json: {exc}") from None
        for p in info.get("peers", []):
            peers[str(p["name"])] = dict(p)
        if info.get("net", {}).get("mode") == "netns":
            net = NamespaceNet.attach(info["net"])
        events_file = rd / "chaos-events.jsonl"
        supervised = bool(info.get("restart_failed"))
    for spec in peer_flags:
        name, p = parse_peer_flag(spec)
        peers[name] = p
    if not peers:
        raise ScenarioError("no peers to act on: give --run-dir RUN_DIR or --peer NAME=PID@ADDR")
    return ProcessTarget(peers, net, events_file, rd, supervised)


def run_chaos(args: Any) -> int:
    """``gossip-train chaos``: apply a scenario to peers that are already running."""
    from .cli import run_async
    from .netns import cleanup_stale

    if args.cleanup_stale:
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespaces and links: {' '.join(removed) or '-'}")
        if not (args.scenario or args.fault or args.random):
            return 0
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    scenario = scenario + scenario_from_flags(args.fault or [], args.random or [])
    if scenario.empty:
        raise ScenarioError("nothing to inject: give a SCENARIO file, --fault or --random")
    target = target_from_args(args.run_dir, args.peer or [])
    actions = plan(scenario, target.names, args.chaos_seed)
    check_target(actions, target.net, args.scenario or "--fault")
    if target.supervised is False and any(a.kind == "restart" for a in actions):
        raise ScenarioError(
            f"restart needs a supervisor: {args.run_dir} was started without --restart-failed"
        )
    seed = scenario.seed if args.chaos_seed is None else args.chaos_seed
    mode = target.net.mode if target.net else "process"
    target.record(
        {
            "kind": "chaos_plan",
            "mode": mode,
            "seed": seed,
            "actions": [a.to_json() for a in actions],
        }
    )
    run_async(Driver(actions, target, args.cluster).run())
    return 0


# -- command-line flags (wired into trainer.cli) ------------------------------------------------


def add_local_args(p: Any) -> None:
    """Flags of ``gossip-train local`` for hosts in namespaces, faults and the report."""
    g = p.add_argument_group("hosts and failure injection")
    g.add_argument(
        "--netns",
        action="store_true",
        help="each peer in its own network namespace with its own IP (needs root)",
    )
    g.add_argument(
        "--netns-sysctl",
        action="append",
        metavar="KEY=VALUE",
        help="kernel setting inside every peer's namespace, e.g. net.ipv4.tcp_retries2=5",
    )
    g.add_argument(
        "--proxy",
        action="store_true",
        help="route peer traffic through the fault-injecting TCP proxy (the default for "
        "network faults without --netns)",
    )
    _add_fault_args(g)
    g.add_argument(
        "--allow-control",
        action="store_true",
        help="peers accept slow-peer commands from `gossip-train chaos` (on with --chaos)",
    )
    g.add_argument(
        "--baseline",
        metavar="RUN_DIR|auto",
        help="no-fault run to compare accuracy with; auto: run it first, same seed",
    )
    g.add_argument(
        "--epsilon",
        type=float,
        default=0.05,
        help="report: largest relative distance of a peer's weights from the consensus "
        "(default 0.05)",
    )


def _add_fault_args(g: Any, file_flag: bool = True) -> None:
    if file_flag:
        g.add_argument("--chaos", metavar="SCENARIO", help="TOML file of faults (docs/chaos.md)")
    g.add_argument(
        "--fault",
        action="append",
        metavar="SPEC",
        help="one fault, e.g. 'at=10 kind=kill peer=2' (repeatable)",
    )
    g.add_argument(
        "--random",
        action="append",
        metavar="SPEC",
        help="seeded random faults, e.g. 'kind=kill every=20 jitter=5 until=180' (repeatable)",
    )
    g.add_argument(
        "--chaos-seed", type=int, help="seed for random faults (default: the scenario's seed)"
    )


def add_chaos_parser(sub: Any) -> None:
    """``gossip-train chaos``: faults for peers that are already running."""
    p = sub.add_parser(
        "chaos",
        help="inject faults into peers that are already running",
        description="Apply a fault scenario to running peers: those of a `gossip-train local` "
        "run (--run-dir, reads RUN_DIR/peers.json) and/or ones named with --peer.",
    )
    p.add_argument("scenario", nargs="?", metavar="SCENARIO", help="TOML file of faults")
    p.add_argument("--run-dir", help="a running `gossip-train local` run (reads peers.json)")
    p.add_argument(
        "--peer",
        action="append",
        metavar="NAME=PID@HOST:PORT",
        help="a peer to act on: its process id (kill, pause) and address (slow-peer)",
    )
    p.add_argument("--cluster", default="gossip-train", help="swarm name (for control commands)")
    p.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="remove namespaces and links that killed runs left behind, then go on",
    )
    _add_fault_args(p, file_flag=False)
