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
launcher's children (``trainer.launch.local``) or processes found in a run's ``peers.json``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..poison import MODES as POISON_MODES
from ..poison import check as check_poison
from .netns import parse_rate

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
    "poison": ("peer", "mode", "factor?", "duration?"),
    "unpoison": ("peer",),
}
# What ends a fault that has a duration.
UNDO = {
    "pause": "resume",
    "partition": "heal",
    "slow-link": "unslow-link",
    "slow-peer": "unslow-peer",
    "poison": "unpoison",
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
    mode: str | None = None  # poison: zero, negate, scale or noise
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
        if self.mode is not None:
            out["mode"] = self.mode
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
    if kind in ("resume", "heal", "unslow-link", "unslow-peer", "unpoison"):
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
        elif key == "factor" and kind == "poison":
            params[key] = _number(entry, key, where, minimum=0.0)
            why = check_poison(str(entry.get("mode")), params[key])
            if why is not None:
                raise ScenarioError(f"{where(key)}: {why}")
        elif key == "factor":
            params[key] = _number(entry, key, where, minimum=1.0)
            if params[key] > 1000:
                raise ScenarioError(f"{where(key)}: factor must be at most 1000")
        elif key == "mode":
            if value not in POISON_MODES:
                raise ScenarioError(
                    f"{where(key)}: poison mode must be one of {', '.join(POISON_MODES)}, "
                    f"not {value!r}"
                )
            params[key] = str(value)
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
        mode=params.get("mode"),
        source=source,
    )
    out = [base]
    if kind in UNDO and "duration" in params:
        out.append(
            Action(at + params["duration"], UNDO[kind], peers=base.peers, source=source + " end")
        )
    return out


# -- applying faults ---------------------------------------------------------------------------
