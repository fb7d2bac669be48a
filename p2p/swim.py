"""SWIM membership with Lifeguard's refinements, as a pure state machine.

No sockets, no asyncio, no clock: every entry point takes ``now`` (seconds on any monotonic
clock) and returns the messages to send as ``(addr, message)`` pairs. ``p2p.membership`` drives
it on an event loop; ``p2p.simulation`` drives many of them on a fake clock.

How it works (docs/membership.md has the long version):

- Probing: every probe interval, ping the next member of a shuffled round-robin list. No ack
  within the probe timeout: ask ``indirect_checks`` members to ping it for us (``ping_req``);
  they answer with the ack, or a ``nack`` when the target stays silent. No ack by the end of
  the interval: suspect it.
- Suspicion: a suspect gets a timer that starts at the maximum and shrinks towards the
  minimum with each independent confirmation (Lifeguard). A member that hears it is suspected
  refutes by raising its incarnation. A timer that runs out declares the member dead.
- Dissemination: updates (alive, suspect, dead, left) ride on pings and acks and on gossip
  messages to ``gossip_nodes`` random members, each retransmitted
  ``retransmit_mult * ceil(log10(N + 1))`` times, the least-sent first.
- Anti-entropy: a periodic full-state push-pull with one random member. Now and then the
  partner is a dead member, so a healed partition merges back; with nobody left, the seeds.
- Local health (Lifeguard): failed probes, missing nacks and refutations raise a score, acks
  lower it; the driver adds its event-loop lag through ``set_health``. Probe timeouts and the
  probe interval stretch by ``score + 1``.

Messages are plain dicts of msgpack-able primitives, each with ``type``, ``from`` (the sender's
name), ``addr`` (where it listens) and ``inc`` (its incarnation; optional on input, and taken
as the sender's own alive claim):

    ping      seq, target (name), updates        -> ack to the sender
    ack       seq, updates
    ping_req  seq, target, target_addr, nack     -> ping target; relay its ack, or a nack
    nack      seq
    gossip    updates
    push_pull members [[name, addr, incarnation, state, meta], ...], reply, join

``meta`` is a short string a member says about itself (gossip-train: its phase, "finished"
once it has trained its last step); it travels with every alive claim, the envelope's
included, and changes only with a new incarnation (``set_meta``), so the newest wins.
Optional on input: absent means "".

An update is ``{"kind": "alive", "name", "addr", "inc", "meta"}``, ``{"kind": "suspect" | "dead",
"name", "inc", "by"}`` or ``{"kind": "left", "name", "inc"}``.

Anything malformed is dropped with one warning per kind of problem (later ones at debug level)
and counted in ``Swim.rejected``; nothing from the wire can raise out of ``on_message``.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import reprlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

# Longest name or address accepted, in characters. With max_members entries a full-state
# message stays well below the transport's 1 MiB header limit.
MAX_NAME = 128
# Longest member meta accepted, in characters.
MAX_META = 64
# Incarnations and sequence numbers must fit msgpack's unsigned 64-bit integers.
MAX_INT = 2**63 - 1
# Indirect probes we run for others at once; more are refused (a ping_req flood amplifies).
MAX_RELAYS = 256
# First wait before a join request is repeated; it doubles up to the probe interval.
JOIN_RETRY_FIRST = 0.05
# Seed addresses remembered from join(), for a peer that has lost everybody else.
MAX_SEEDS = 32

Out = tuple[str, dict[str, Any]]
Update = dict[str, Any]


class State(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


LIVE = (State.ALIVE, State.SUSPECT)
GONE = (State.DEAD, State.LEFT)


@dataclass(slots=True)
class Member:
    name: str
    addr: str
    incarnation: int
    state: State
    since: float  # when the state last changed, on the owner's clock
    meta: str = ""  # what the member says about itself (see the module doc)


@dataclass(frozen=True)
class SwimConfig:
    """Timing and limits of SWIM. ``lan()`` is memberlist's DefaultLANConfig; see the profiles."""

    # Seconds between probes of the next member. Failure detection time grows with it; lower
    # costs one ping and ack per interval per peer. Default 1.0 (memberlist LAN).
    probe_interval: float = 1.0
    # Seconds to wait for a direct ack before asking others to probe; at most half the
    # interval, so indirect probes and their nacks finish within it. Set near the 99th
    # percentile round trip *including* event-loop lag. Default 0.5.
    probe_timeout: float = 0.5
    # Members asked to probe indirectly after a missed ack. More make a false suspicion from
    # one bad link less likely, at k extra ping_req + ping + ack. Default 3.
    indirect_checks: int = 3
    # Suspicion minimum = suspicion_mult * max(1, log10(N)) * probe_interval. Higher gives a
    # slow or briefly unreachable peer more time to refute, and delays real detection. Default 4.
    suspicion_mult: int = 4
    # Suspicion maximum = this * minimum; a suspicion nobody confirms runs this long (Lifeguard).
    # Default 6.
    suspicion_max_timeout_mult: int = 6
    # Each update is retransmitted retransmit_mult * ceil(log10(N + 1)) times. Higher reaches
    # every peer more surely under loss, at more bytes per message. Default 4.
    retransmit_mult: int = 4
    # Seconds between gossip rounds that carry pending updates to gossip_nodes random
    # members (nothing is sent when nothing is pending). Lower spreads news faster. Default 0.2.
    gossip_interval: float = 0.2
    # Members each gossip round sends to (the fanout). Default 3.
    gossip_nodes: int = 3
    # Seconds a dead member still receives gossip, so that a live one wrongly declared dead
    # learns it and refutes. Default 30.
    gossip_to_dead_time: float = 30.0
    # Seconds between full-state push-pulls with one random member (0 disables), scaled up
    # beyond 32 members. Heals partitions and missed updates; each costs two lists of all
    # members. Default 30.
    push_pull_interval: float = 30.0
    # Local health scales probe timeouts by up to this factor (score 0 .. this - 1). Higher
    # tolerates a more overloaded peer, and slows its own detection of others. Default 8.
    awareness_max_multiplier: int = 8
    # Most members known at once (dead ones included until reaped); a larger full state is
    # refused. Bounds memory and the push-pull message size. Default 2048.
    max_members: int = 2048
    # Most updates carried by one message; more in an incoming message are ignored. Bounds
    # message size and the work one message can cause. Default 16.
    max_piggyback: int = 16
    # Seconds after which a dead or left member is forgotten. Until then a dead member is now
    # and then a push-pull partner, which is how partitions heal (Serf: 24 h). Default 86400.
    reap_after: float = 86400.0
    # Seconds the driver gives the transport to send one message before counting it lost.
    # Default 10 (memberlist TCPTimeout).
    send_timeout: float = 10.0

    def __post_init__(self) -> None:
        positive = ("probe_interval", "probe_timeout", "gossip_interval", "send_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SwimConfig.{name} must be > 0")
        if self.probe_timeout * 2 > self.probe_interval:
            raise ValueError("SwimConfig.probe_timeout must be at most half of probe_interval")
        ints = (
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "retransmit_mult",
            "gossip_nodes",
            "awareness_max_multiplier",
            "max_members",
            "max_piggyback",
        )
        for name in ints:
            if getattr(self, name) < 1:
                raise ValueError(f"SwimConfig.{name} must be >= 1")
        if self.indirect_checks < 0 or self.push_pull_interval < 0:
            raise ValueError("SwimConfig: indirect_checks and push_pull_interval must be >= 0")
        if not self.reap_after > 0 or self.gossip_to_dead_time < 0:
            raise ValueError("SwimConfig: reap_after must be > 0, gossip_to_dead_time >= 0")

    @classmethod
    def lan(cls) -> SwimConfig:
        """memberlist's DefaultLANConfig: a data-centre network, up to a few thousand peers."""
        return cls()

    @classmethod
    def local(cls) -> SwimConfig:
        """One machine (loopback). Finds a SIGKILLed peer among 5 in about 2-4 s, while
        training holds every core and the event loop lags by tens of milliseconds."""
        return cls(
            probe_interval=0.5,
            probe_timeout=0.25,
            indirect_checks=2,
            suspicion_mult=3,
            suspicion_max_timeout_mult=4,
            retransmit_mult=3,
            gossip_interval=0.1,
            gossip_to_dead_time=15.0,
            push_pull_interval=15.0,
            reap_after=3600.0,
            send_timeout=1.0,
        )

    @classmethod
    def wan(cls) -> SwimConfig:
        """memberlist's DefaultWANConfig: peers across the internet."""
        return cls(
            probe_interval=5.0,
            probe_timeout=2.5,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_dead_time=60.0,
            push_pull_interval=60.0,
            send_timeout=30.0,
        )

    @classmethod
    def test(cls) -> SwimConfig:
        """Fast timers for tests on a real event loop: a dead peer is found in about a second."""
        return cls(
            probe_interval=0.2,
            probe_timeout=0.1,
            indirect_checks=2,
            suspicion_mult=3,
            suspicion_max_timeout_mult=3,
            retransmit_mult=3,
            gossip_interval=0.05,
            gossip_to_dead_time=2.0,
            push_pull_interval=1.0,
            awareness_max_multiplier=4,
            reap_after=30.0,
            send_timeout=0.5,
        )

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        """(minimum, maximum) suspicion timeout in a group of ``n`` live members."""
        scale = max(1.0, math.log10(max(1, n)))
        low = self.suspicion_mult * scale * self.probe_interval
        return low, low * self.suspicion_max_timeout_mult

    def retransmit_limit(self, n: int) -> int:
        """How many times one update is sent, in a group of ``n`` live members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_period(self, n: int) -> float:
        """Push-pull interval scaled like memberlist: one more step per doubling beyond 32."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)


class _Reject(Exception):
    """An incoming message is malformed or not acceptable: drop it whole."""

    def __init__(self, category: str, detail: str = "") -> None:
        super().__init__(category)
        self.category = category
        self.detail = detail


@dataclass
class _Probe:
    seq: int
    target: str
    addr: str
    incarnation: int
    start: float
    indirect_sent: bool = False
    indirect_at: float = 0.0
    nacks_expected: int = 0
    nacks: int = 0


@dataclass
class _Relay:
    origin_addr: str
    origin_seq: int
    deadline: float
    nack: bool


@dataclass
class _Suspicion:
    """Lifeguard's suspicion timer: max with no confirmations, min after k of them."""

    start: float
    k: int
    low: float
    high: float
    confirmers: set[str] = field(default_factory=set)
    n: int = 0
    last_call: float | None = None  # set when the timer ran out and a final ping went out

    def deadline(self) -> float:
        if self.last_call is not None:
            return self.last_call
        if self.k < 1:
            return self.start + self.low
        frac = math.log(self.n + 1) / math.log(self.k + 1)
        return self.start + max(self.low, self.high - frac * (self.high - self.low))

    def confirm(self, by: str) -> bool:
        """Count an independent confirmation; False for a repeat or once k is reached."""
        if self.n >= self.k or by in self.confirmers:
            return False
        self.confirmers.add(by)
        self.n += 1
        return True


@dataclass
class _Broadcast:
    update: Update
    transmits: int
    order: int


# -- field checks (raise _Reject) ---------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _show(value: Any, limit: int = 80) -> str:
    """A wire value for a log line, bounded in length and in depth: a plain ``repr`` of a
    value nested ~1000 deep (msgpack decodes up to 1024 levels) raises RecursionError."""
    return _REPR.repr(value)[:limit]


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise _Reject(f"bad field {key!r}", _show(value))
    return value


def _int(value: Any, key: str, top: int = MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise _Reject(f"bad field {key!r}", _show(value))
    return value


def _meta(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_META:
        raise _Reject("bad field 'meta'", _show(value))
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Reject(f"bad field {key!r}", _show(value))
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Reject(f"bad field {key!r}", type(value).__name__)
    return value


# kind, name, addr ("" unless alive), inc, by, meta ("" unless alive)
ParsedUpdate = tuple[str, str, str, int, str, str]


def _parse_update(raw: Any) -> ParsedUpdate:
    if not isinstance(raw, dict):
        raise _Reject("bad update", type(raw).__name__)
    kind = raw.get("kind")
    name = _name(raw.get("name"), "name")
    inc = _int(raw.get("inc"), "inc")
    if kind == "alive":
        return kind, name, _name(raw.get("addr"), "addr"), inc, name, _meta(raw.get("meta"))
    if kind in ("suspect", "dead"):
        return kind, name, "", inc, _name(raw.get("by"), "by"), ""
    if kind == "left":
        return kind, name, "", inc, name, ""
    raise _Reject("unknown update kind", _show(kind, 40))


Entry = tuple[str, str, int, State, str]  # name, addr, incarnation, state, meta


def _parse_entry(raw: Any) -> Entry:
    if not isinstance(raw, list) or len(raw) not in (4, 5):
        raise _Reject("bad member entry", _show(raw))
    name, addr, inc, state = raw[:4]
    st = _int(state, "state", top=int(State.LEFT))
    meta = _meta(raw[4] if len(raw) == 5 else None)
    return _name(name, "name"), _name(addr, "addr"), _int(inc, "inc"), State(st), meta


class Swim:
    """One peer's view of the group. Not thread-safe; drive it from one task."""

    def __init__(
        self,
        name: str,
        addr: str,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        meta: str = "",
    ) -> None:
        for key, value in (("name", name), ("addr", addr)):
            if not isinstance(value, str) or not value or len(value) > MAX_NAME:
                raise ValueError(f"Swim {key} must be 1..{MAX_NAME} characters, got {value!r}")
        if not 0 <= incarnation < MAX_INT:
            raise ValueError(f"incarnation out of range: {incarnation}")
        self.name = name
        self.addr = addr
        self.config = config
        self._rng = rng
        if len(meta) > MAX_META:
            raise ValueError(f"Swim meta must be at most {MAX_META} characters, got {meta!r}")
        self._members: dict[str, Member] = {
            name: Member(name, addr, incarnation, State.ALIVE, now, meta)
        }
        self._addr_owner: dict[str, str] = {addr: name}
        self._live = 1  # members ALIVE or SUSPECT, self included
        self._live_cache: list[str] | None = None
        self._recent_dead: dict[str, float] = {}
        self._events: list[dict[str, Any]] = []
        self._queue: dict[str, _Broadcast] = {}
        self._bcast_order = 0
        self._suspicions: dict[str, _Suspicion] = {}
        self._order: list[str] = []
        self._order_idx = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._awareness = 0
        self._external_health = 0
        self._seeds: list[str] = []
        self._next_join = math.inf
        self._join_wait = JOIN_RETRY_FIRST
        self._joined = False
        self._leaving = False
        # Counts of dropped input by kind of problem; the first of each kind is logged.
        self.rejected: Counter[str] = Counter()
        # Stagger the first rounds so that peers started together do not probe in lockstep.
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        self._next_push_pull = math.inf
        if config.push_pull_interval > 0:
            self._next_push_pull = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._enqueue(self._self_alive())

    # -- public view --------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._members[self.name].incarnation

    @property
    def meta(self) -> str:
        return self._members[self.name].meta

    def set_meta(self, meta: str) -> None:
        """Say something new about ourselves: a new incarnation carries it to everyone."""
        if len(meta) > MAX_META:
            raise ValueError(f"Swim meta must be at most {MAX_META} characters, got {meta!r}")
        me = self._members[self.name]
        if meta == me.meta or self._leaving:
            return
        me.meta = meta
        me.incarnation = min(MAX_INT, me.incarnation + 1)
        self._enqueue(self._self_alive())

    @property
    def health(self) -> int:
        """Local health score, 0 = healthy; probe timeouts are multiplied by score + 1."""
        top = self.config.awareness_max_multiplier - 1
        return min(top, self._awareness + self._external_health)

    def set_health(self, score: int) -> None:
        """The driver's share of the health score (event-loop lag), clamped to the range."""
        self._external_health = max(0, min(int(score), self.config.awareness_max_multiplier - 1))

    def joined(self) -> bool:
        """True once a push-pull reply has arrived (we are connected to someone)."""
        return self._joined

    def leaving(self) -> bool:
        return self._leaving

    def leave_done(self) -> bool:
        """True once our 'left' update has been sent as often as the retransmit limit asks."""
        return self._leaving and (self.name not in self._queue or not self._live_names())

    def members(self) -> list[Member]:
        """Every known member, self included, dead and left ones until reaped (copies)."""
        return [replace(m) for m in self._members.values()]

    def alive(self) -> list[Member]:
        """Members not known to be dead or left (ALIVE or SUSPECT), self excluded (copies)."""
        return [replace(self._members[n]) for n in self._live_names()]

    def live_names(self) -> list[str]:
        """Names of the members alive() returns, without copying the members."""
        return list(self._live_names())

    def state_of(self, name: str) -> State | None:
        m = self._members.get(name)
        return None if m is None else m.state

    def num_live(self) -> int:
        """ALIVE and SUSPECT members, self included."""
        return self._live

    def drain_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def broadcasts_pending(self) -> int:
        return len(self._queue)

    def next_deadline(self) -> float:
        """When tick() must run next (it may run earlier; it does nothing that is not due)."""
        d = min(self._next_probe, self._next_gossip, self._next_push_pull, self._next_join)
        p = self._probe
        if p is not None:
            d = min(d, self._probe_deadline(p))
        for s in self._suspicions.values():
            d = min(d, s.deadline())
        for r in self._relays.values():
            d = min(d, r.deadline)
        return d

    # -- entry points -------------------------------------------------------------------

    def join(self, seeds: list[str], now: float) -> list[Out]:
        """Push-pull our state to every seed; the first reply makes joined() true.

        Until then tick() repeats the request, first after JOIN_RETRY_FIRST seconds, then
        twice as long each time up to the probe interval, so a lost message or a seed that
        starts a moment later (peers launched together) delays the join by tens of
        milliseconds, and a seed that is down costs one message per probe interval.
        """
        good = [s for s in seeds if isinstance(s, str) and 0 < len(s) <= MAX_NAME]
        self._seeds = [s for s in dict.fromkeys(good) if s != self.addr][:MAX_SEEDS]
        self._next_join = now
        self._join_wait = JOIN_RETRY_FIRST
        outs: list[Out] = []
        self._retry_join(now, outs)
        return outs

    def rejoin(self, seeds: list[str], now: float) -> list[Out]:
        """join() again, through new seeds, although we joined once: a member alone (its
        group gone, or two groups that formed apart) reaches out until one answers."""
        self._joined = False
        return self.join(seeds, now)

    def _retry_join(self, now: float, outs: list[Out]) -> None:
        if self._joined or not self._seeds:
            self._next_join = math.inf
            return
        self._next_join = now + self._join_wait
        self._join_wait = min(2 * self._join_wait, self.config.probe_interval)
        msg = self._push_pull_msg(reply=False, join=True)
        outs.extend((seed, msg) for seed in self._seeds)

    def preload(self, members: list[tuple[str, str, int]], now: float) -> None:
        """Know these (name, addr, incarnation) as alive, with no events and no gossip.

        For simulations and benchmarks that start from an already converged group.
        """
        for name, addr, inc in members:
            if name == self.name or name in self._members or not self._may_add(name, addr):
                continue
            self._members[name] = Member(name, addr, inc, State.ALIVE, now)
            self._addr_owner[addr] = name
            self._live += 1
        self._live_cache = None
        self._order_idx = len(self._order)  # rebuild the probe order on the next probe
        if self._live > 1:
            self._joined = True
            self._next_join = math.inf

    def on_message(self, msg: object, now: float) -> list[Out]:
        """Handle one incoming message; anything malformed is dropped (see module doc)."""
        try:
            kind, sender, addr, inc, meta = self._envelope(msg)
            handler = self._handlers.get(kind)
            if handler is None:
                raise _Reject("unknown message type", _show(kind, 40))
            assert isinstance(msg, dict)
            if inc is not None:
                # Every message is the sender's own word that it is alive at ``inc``: a ping
                # from a newcomer introduces it, one from a refuted member clears it.
                self._on_alive(sender, addr, inc, now, meta)
            return handler(self, msg, sender, addr, now)
        except _Reject as e:
            self._note(e.category, e.detail)
            return []

    def tick(self, now: float) -> list[Out]:
        """Run whatever is due: timeouts, the next probe, gossip, push-pull."""
        outs: list[Out] = []
        self._expire_suspicions(now, outs)
        self._expire_relays(now, outs)
        self._maybe_indirect(now, outs)
        self._advance_probe(now)
        if now >= self._next_probe:
            self._start_probe(now, outs)
        if now >= self._next_gossip:
            self._gossip(now, outs)
        if now >= self._next_push_pull:
            self._push_pull(now, outs)
        if now >= self._next_join:
            self._retry_join(now, outs)
        return outs

    def leave(self, now: float) -> list[Out]:
        """Announce a graceful leave (LEFT, not DEAD); stop probing. Keep calling tick()
        until leave_done() so that gossip repeats the news.

        The news goes to every live member at once: a leave happens once per peer, and a
        member that missed the gossip would later probe us, fail, and call us dead.
        """
        if self._leaving:
            return []
        self._leaving = True
        me = self._members[self.name]
        self._set_state(me, State.LEFT, now)
        self._probe = None
        self._next_probe = math.inf
        self._next_push_pull = math.inf
        update = {"kind": "left", "name": self.name, "inc": me.incarnation}
        self._enqueue(update)
        msg = self._env("gossip", updates=[update])
        return [(self._members[n].addr, msg) for n in self._live_names()]

    # -- input checks -------------------------------------------------------------------

    def _envelope(self, msg: object) -> tuple[str, str, str, int | None, str]:
        if not isinstance(msg, dict):
            raise _Reject("message is not a map", type(msg).__name__)
        kind = msg.get("type")
        if not isinstance(kind, str):
            raise _Reject("bad field 'type'", _show(kind, 40))
        sender = _name(msg.get("from"), "from")
        addr = _name(msg.get("addr"), "addr")
        if sender == self.name:
            raise _Reject("message claims our own name", f"{sender} at {addr}")
        inc = msg.get("inc")
        meta = _meta(msg.get("meta"))
        return kind, sender, addr, None if inc is None else _int(inc, "inc"), meta

    def _note(self, category: str, detail: str) -> None:
        """Count a dropped input; warn on the first of its kind only."""
        self.rejected[category] += 1
        if self.rejected[category] == 1:
            log.warning(
                "%s: dropped input: %s (%s); repeats are logged at debug level",
                self.name,
                category,
                detail,
            )
        else:
            log.debug("%s: dropped input: %s (%s)", self.name, category, detail)

    def _updates(self, msg: dict[str, Any]) -> list[ParsedUpdate]:
        raw = _list(msg.get("updates", []), "updates")
        limit = self.config.max_piggyback
        if len(raw) > limit:
            self._note("too many updates in one message", f"{len(raw)} > {limit}, rest ignored")
            raw = raw[:limit]
        return [_parse_update(u) for u in raw]

    def _apply(self, updates: list[ParsedUpdate], now: float) -> None:
        for kind, name, addr, inc, by, meta in updates:
            if kind == "alive":
                self._on_alive(name, addr, inc, now, meta)
            elif kind == "suspect":
                self._on_suspect(name, inc, by, now)
            else:
                self._on_dead(name, inc, by, kind == "left", now)

    # -- message handlers ---------------------------------------------------------------

    def _h_ping(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        seq = _int(msg.get("seq"), "seq")
        target = _name(msg.get("target"), "target")
        updates = self._updates(msg)
        if target != self.name:
            # Someone else used to live at our address; not answering lets them find out.
            raise _Reject("ping for another name", f"{target} from {sender}")
        self._apply(updates, now)
        ups: list[Update] = []
        if self._accusing(updates):
            # The buddy system told us the pinger suspects us: the answer leads with our
            # (possibly just raised) incarnation, whatever else is queued.
            ups.append(self._self_alive())
        ups += self._our_view_of(sender, addr)
        ups += self._take(self.config.max_piggyback - len(ups))
        return [(addr, self._env("ack", seq=seq, updates=ups))]

    def _h_ack(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        seq = _int(msg.get("seq"), "seq")
        updates = self._updates(msg)
        self._apply(updates, now)
        outs = self._answer(addr) if self._accusing(updates) else []
        p = self._probe
        relay = self._relays.pop(seq, None)
        if p is not None and seq == p.seq:
            self._probe = None
            self._awareness_delta(-1)
        elif relay is not None:
            ups = self._take(self.config.max_piggyback)
            outs.append((relay.origin_addr, self._env("ack", seq=relay.origin_seq, updates=ups)))
        return outs  # an ack for neither is late: its probe is already decided

    def _h_ping_req(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        seq = _int(msg.get("seq"), "seq")
        target = _name(msg.get("target"), "target")
        target_addr = _name(msg.get("target_addr"), "target_addr")
        nack = _bool(msg.get("nack", False), "nack")
        if target == self.name or target_addr == self.addr:
            raise _Reject("ping_req about ourselves", sender)
        if len(self._relays) >= MAX_RELAYS:
            raise _Reject("too many indirect probes in flight", sender)
        self._seq += 1
        # Nack at 80% of our probe timeout so it reaches the origin within its interval.
        wait = 0.8 * self.config.probe_timeout * (self.health + 1)
        self._relays[self._seq] = _Relay(addr, seq, now + wait, nack)
        ups = self._take(self.config.max_piggyback)
        return [(target_addr, self._env("ping", seq=self._seq, target=target, updates=ups))]

    def _h_nack(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        seq = _int(msg.get("seq"), "seq")
        p = self._probe
        if p is not None and seq == p.seq:
            p.nacks += 1
        return []

    def _h_gossip(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        updates = self._updates(msg)
        self._apply(updates, now)
        return self._answer(addr) if self._accusing(updates) else []

    def _h_push_pull(self, msg: dict[str, Any], sender: str, addr: str, now: float) -> list[Out]:
        raw = _list(msg.get("members"), "members")
        if len(raw) > self.config.max_members:
            raise _Reject("member list over the limit", f"{len(raw)} from {sender}")
        reply = _bool(msg.get("reply", False), "reply")
        join = _bool(msg.get("join", False), "join")
        entries = [_parse_entry(e) for e in raw]
        self._merge(entries, now)
        if reply:
            if not self._joined:
                log.info("%s: joined through %s at %s", self.name, sender, addr)
                # Our own news first: the merge just queued everything the seed told us.
                self._enqueue(self._self_alive())
            self._joined = True
            self._next_join = math.inf
            accused = any(e[0] == self.name and e[3] != State.ALIVE for e in entries)
            return self._answer(addr) if accused else []
        if join:
            log.debug("%s: %s at %s joins through us", self.name, sender, addr)
        return [(addr, self._push_pull_msg(reply=True, join=False))]

    def _accusing(self, updates: list[ParsedUpdate]) -> bool:
        return any(u[1] == self.name and u[0] in ("suspect", "dead") for u in updates)

    def _answer(self, addr: str) -> list[Out]:
        """Tell whoever just accused us, directly, that we are alive (and at which
        incarnation): it holds an old view of us and may have missed our refutation."""
        if self._leaving:
            return []
        return [(addr, self._env("gossip", updates=[self._self_alive()]))]

    def _our_view_of(self, name: str, addr: str) -> list[Update]:
        """When a member we hold suspect or dead pings us, the ack tells it so: it may be
        alive, and has no other way to learn that it must refute."""
        m = self._members.get(name)
        if m is None or m.addr != addr or m.state not in (State.SUSPECT, State.DEAD):
            return []
        kind = "suspect" if m.state == State.SUSPECT else "dead"
        return [{"kind": kind, "name": name, "inc": m.incarnation, "by": self.name}]

    _handlers = {
        "ping": _h_ping,
        "ack": _h_ack,
        "ping_req": _h_ping_req,
        "nack": _h_nack,
        "gossip": _h_gossip,
        "push_pull": _h_push_pull,
    }

    def _merge(self, entries: list[Entry], now: float) -> None:
        for name, addr, inc, state, meta in entries:
            if state == State.ALIVE:
                self._on_alive(name, addr, inc, now, meta)
            elif state == State.LEFT:
                self._on_dead(name, inc, name, True, now)
            elif self.state_of(name) != State.SUSPECT:
                # Like memberlist: a remote "dead" only makes us suspect, so that a live
                # member we disagree about gets its chance to refute. Unlike memberlist, a
                # full state never confirms a suspicion: it says nothing about who checked.
                self._on_suspect(name, inc, self.name, now)

    # -- state transitions --------------------------------------------------------------

    def _on_alive(self, name: str, addr: str, inc: int, now: float, meta: str = "") -> None:
        if name == self.name:
            self._alive_about_self(addr, inc)
            return
        m = self._members.get(name)
        if m is None:
            self._add_member(name, addr, inc, now, meta)
            return
        if inc <= m.incarnation:
            return  # stale or a repeat
        if addr != m.addr:
            if m.state in LIVE:
                self._note("name claimed from another address", f"{name}: {m.addr} vs {addr}")
                return
            if self._addr_taken(addr, name):
                self._note("address claimed by another name", f"{addr} for {name}")
                return
        self._revive(m, addr, inc, now, meta)

    def _add_member(self, name: str, addr: str, inc: int, now: float, meta: str = "") -> None:
        if not self._may_add(name, addr):
            return
        self._members[name] = Member(name, addr, inc, State.ALIVE, now, meta)
        self._addr_owner[addr] = name
        self._live += 1
        self._live_cache = None
        self._order_insert(name)
        self._event("joined", name, now, addr=addr, incarnation=inc, **_meta_field(meta))
        self._enqueue(_alive(name, addr, inc, meta))

    def _may_add(self, name: str, addr: str) -> bool:
        if len(self._members) >= self.config.max_members:
            self._note("member limit reached", f"{name} not added")
            return False
        if self._addr_taken(addr, name):
            self._note("address claimed by another name", f"{addr} for {name}")
            return False
        return True

    def _addr_taken(self, addr: str, name: str) -> bool:
        owner = self._addr_owner.get(addr)
        if owner is None or owner == name:
            return False
        m = self._members.get(owner)
        return m is not None and (m.state in LIVE or owner == self.name)

    def _revive(self, m: Member, addr: str, inc: int, now: float, meta: str = "") -> None:
        old, old_meta = m.state, m.meta
        self._suspicions.pop(m.name, None)
        self._recent_dead.pop(m.name, None)
        if addr != m.addr:
            if self._addr_owner.get(m.addr) == m.name:
                del self._addr_owner[m.addr]
            m.addr = addr
            self._addr_owner[addr] = m.name
        m.incarnation = inc
        m.meta = meta
        if old != State.ALIVE:
            self._set_state(m, State.ALIVE, now)
            if old in GONE:
                self._order_insert(m.name)
            self._event(
                "alive",
                m.name,
                now,
                addr=addr,
                incarnation=inc,
                previous=old.name.lower(),
                **_meta_field(meta),
            )
        elif meta != old_meta:
            self._event("meta", m.name, now, meta=meta, incarnation=inc)
        self._enqueue(_alive(m.name, addr, inc, meta))

    def _alive_about_self(self, addr: str, inc: int) -> None:
        # An older incarnation loses anyway; refuting it would only bump ours again and again.
        if self._leaving or inc < self.incarnation or (addr, inc) == (self.addr, self.incarnation):
            return
        if addr != self.addr:
            self._note("another peer claims our name", addr)
        self._refute(inc)

    def _on_suspect(self, name: str, inc: int, by: str, now: float) -> None:
        if name == self.name:
            self._accused(inc)
            return
        m = self._members.get(name)
        if m is None or inc < m.incarnation or m.state in GONE:
            return
        if m.state == State.SUSPECT:
            s = self._suspicions.get(name)
            if s is not None and s.confirm(by):
                self._enqueue({"kind": "suspect", "name": name, "inc": inc, "by": by})
            return
        m.incarnation = inc
        self._set_state(m, State.SUSPECT, now)
        self._suspicions[name] = self._new_suspicion(by, now)
        self._event("suspect", name, now, incarnation=inc, by=by)
        self._enqueue({"kind": "suspect", "name": name, "inc": inc, "by": by})

    def _new_suspicion(self, by: str, now: float) -> _Suspicion:
        low, high = self.config.suspicion_timeouts(self._live)
        k = self.config.suspicion_mult - 2
        if self._live - 2 < k:
            k = 0  # too few members to ever collect k confirmations
        return _Suspicion(now, k, low, high, {by})

    def _on_dead(self, name: str, inc: int, by: str, left: bool, now: float) -> None:
        if name == self.name:
            self._accused(inc)
            return
        m = self._members.get(name)
        if m is None or inc < m.incarnation or m.state == State.LEFT:
            return
        if m.state == State.DEAD and not left:
            return
        # DEAD -> LEFT is allowed: someone who missed the leave and probed in vain must not
        # keep a graceful departure on record as a death.
        m.incarnation = inc
        self._suspicions.pop(name, None)
        if left:
            self._set_state(m, State.LEFT, now)
            self._event("left", name, now, incarnation=inc)
            self._enqueue({"kind": "left", "name": name, "inc": inc})
            return
        self._set_state(m, State.DEAD, now)
        self._recent_dead[name] = now
        self._event("declared_dead", name, now, incarnation=inc, by=by)
        self._enqueue({"kind": "dead", "name": name, "inc": inc, "by": by})

    def _accused(self, inc: int) -> None:
        """Someone says we are suspect or dead at incarnation ``inc``."""
        if inc >= self.incarnation:
            self._refute(inc)
        elif self.name not in self._queue and not self._leaving:
            # An older accusation, already refuted, is still around: whoever holds it missed
            # our refutation, and an ack alone does not clear a suspicion. Say it again.
            self._enqueue(self._self_alive())

    def _refute(self, inc: int) -> None:
        """Someone thinks we are suspect, dead or elsewhere: outbid them with our incarnation."""
        if self._leaving:
            return
        me = self._members[self.name]
        me.incarnation = min(MAX_INT, max(me.incarnation, inc) + 1)
        # Lifeguard: being suspected hints that we are the slow one.
        self._awareness_delta(1)
        log.info("%s: refuting suspicion, incarnation now %d", self.name, me.incarnation)
        self._enqueue(self._self_alive())

    def _set_state(self, m: Member, state: State, now: float) -> None:
        was_live, is_live = m.state in LIVE, state in LIVE
        m.state = state
        m.since = now
        if was_live != is_live:
            self._live += 1 if is_live else -1
            self._live_cache = None

    def _expire_suspicions(self, now: float, outs: list[Out]) -> None:
        due = [n for n, s in self._suspicions.items() if now >= s.deadline()]
        for name in due:
            s = self._suspicions[name]
            m = self._members[name]
            if s.last_call is None:
                # A last call before the verdict: one ping that carries the suspicion. A live
                # member whose refutation never reached us answers with its incarnation (the
                # ack leads with it), which clears the suspicion. Costs one probe timeout.
                s.last_call = now + self.config.probe_timeout * (self.health + 1)
                self._seq += 1
                outs.append((m.addr, self._ping(self._seq, m)))
                continue
            del self._suspicions[name]
            log.info(
                "%s: %s declared dead after %.2f s of suspicion, %d confirmations",
                self.name,
                name,
                now - s.start,
                s.n,
            )
            self._on_dead(name, m.incarnation, self.name, False, now)

    def _awareness_delta(self, delta: int) -> None:
        top = self.config.awareness_max_multiplier - 1
        self._awareness = max(0, min(top, self._awareness + delta))

    def _event(self, kind: str, subject: str, now: float, **extra: Any) -> None:
        self._events.append({"t": now, "kind": kind, "subject": subject, **extra})

    # -- probing ------------------------------------------------------------------------

    def _probe_deadline(self, p: _Probe) -> float:
        """Deadlines are recomputed from the current health, so lag stretches a running probe."""
        c, scale = self.config, self.health + 1
        if p.indirect_sent:
            # Indirect probes always get their share of the interval, even when our loop
            # stalled past the whole interval before sending them.
            rest = (c.probe_interval - c.probe_timeout) * scale
            return max(p.start + c.probe_interval * scale, p.indirect_at + rest)
        return p.start + c.probe_timeout * scale

    def _start_probe(self, now: float, outs: list[Out]) -> None:
        scale = self.health + 1
        if self._probe is not None:  # stretched by a worse health score: not decided yet
            self._next_probe = self._probe.start + self.config.probe_interval * scale
            return
        self._next_probe = now + self.config.probe_interval * scale
        m = self._next_target(now)
        if m is None:
            return
        self._seq += 1
        self._probe = _Probe(self._seq, m.name, m.addr, m.incarnation, now)
        outs.append((m.addr, self._ping(self._seq, m)))

    def _ping(self, seq: int, m: Member) -> dict[str, Any]:
        updates: list[Update] = []
        if m.state == State.SUSPECT:
            # Lifeguard's buddy system: tell a suspect first, so it can refute at once.
            updates.append(
                {"kind": "suspect", "name": m.name, "inc": m.incarnation, "by": self.name}
            )
        updates += self._take(self.config.max_piggyback - len(updates))
        return self._env("ping", seq=seq, target=m.name, updates=updates)

    def _maybe_indirect(self, now: float, outs: list[Out]) -> None:
        p = self._probe
        if p is None or p.indirect_sent or now < self._probe_deadline(p):
            return
        p.indirect_sent = True
        p.indirect_at = now
        live = [
            n for n in self._live_names() if n != p.target and self._members[n].state == State.ALIVE
        ]
        helpers = self._rng.sample(live, min(len(live), self.config.indirect_checks))
        msg = self._env("ping_req", seq=p.seq, target=p.target, target_addr=p.addr, nack=True)
        outs.extend((self._members[n].addr, msg) for n in helpers)
        p.nacks_expected = len(helpers)

    def _advance_probe(self, now: float) -> None:
        """Decide a probe whose whole interval has passed without an ack."""
        p = self._probe
        if p is None or not p.indirect_sent or now < self._probe_deadline(p):
            return
        self._probe = None
        if p.nacks_expected > 0:
            # Helpers that did not even nack point at our own network or loop (Lifeguard).
            self._awareness_delta(max(0, p.nacks_expected - p.nacks))
        else:
            self._awareness_delta(1)
        m = self._members.get(p.target)
        if m is not None and m.state in LIVE:
            self._on_suspect(p.target, p.incarnation, self.name, now)

    def _next_target(self, now: float) -> Member | None:
        for _ in range(2):
            while self._order_idx < len(self._order):
                name = self._order[self._order_idx]
                self._order_idx += 1
                m = self._members.get(name)
                if m is not None and m.state in LIVE and name != self.name:
                    return m
            self._reset_order(now)
        return None

    def _reset_order(self, now: float) -> None:
        """End of a round: forget long-gone members, reshuffle the probe order."""
        old = [
            n
            for n, m in self._members.items()
            if m.state in GONE and now - m.since > self.config.reap_after
        ]
        for name in old:
            m = self._members.pop(name)
            if self._addr_owner.get(m.addr) == name:
                del self._addr_owner[m.addr]
            self._recent_dead.pop(name, None)
            self._queue.pop(name, None)
        self._order = list(self._live_names())
        self._rng.shuffle(self._order)
        self._order_idx = 0

    def _order_insert(self, name: str) -> None:
        """A new member goes to a random place among those not yet probed this round."""
        self._order.append(name)
        j = self._rng.randrange(self._order_idx, len(self._order))
        self._order[-1], self._order[j] = self._order[j], self._order[-1]

    def _expire_relays(self, now: float, outs: list[Out]) -> None:
        due = [seq for seq, r in self._relays.items() if now >= r.deadline]
        for seq in due:
            r = self._relays.pop(seq)
            if r.nack:
                outs.append((r.origin_addr, self._env("nack", seq=r.origin_seq)))

    # -- dissemination ------------------------------------------------------------------

    def _live_names(self) -> list[str]:
        if self._live_cache is None:
            self._live_cache = [
                n for n, m in self._members.items() if m.state in LIVE and n != self.name
            ]
        return self._live_cache

    def _enqueue(self, update: Update) -> None:
        """Queue an update for piggybacking; it replaces any older one about the same member."""
        self._bcast_order += 1
        self._queue[update["name"]] = _Broadcast(update, 0, self._bcast_order)

    def _take(self, limit: int) -> list[Update]:
        """Up to ``limit`` queued updates, least-sent (then newest) first; count the sends."""
        if not self._queue or limit <= 0:
            return []
        items = list(self._queue.values())
        if len(items) > limit:
            items.sort(key=lambda b: (b.transmits, -b.order))
            items = items[:limit]
        top = self.config.retransmit_limit(self._live)
        for b in items:
            b.transmits += 1
            if b.transmits >= top:
                del self._queue[b.update["name"]]
        return [b.update for b in items]

    def _gossip(self, now: float, outs: list[Out]) -> None:
        self._next_gossip = now + self.config.gossip_interval
        if not self._queue:
            return
        for name in self._gossip_targets(now):
            updates = self._take(self.config.max_piggyback)
            if not updates:
                break
            outs.append((self._members[name].addr, self._env("gossip", updates=updates)))

    def _gossip_targets(self, now: float) -> list[str]:
        k = self.config.gossip_nodes
        for name, since in list(self._recent_dead.items()):
            m = self._members.get(name)
            if m is None or m.state != State.DEAD or now - since > self.config.gossip_to_dead_time:
                del self._recent_dead[name]
        pool = self._live_names()
        if self._recent_dead:
            pool = pool + list(self._recent_dead)
        return self._rng.sample(pool, min(k, len(pool)))

    # -- anti-entropy -------------------------------------------------------------------

    def _push_pull(self, now: float, outs: list[Out]) -> None:
        self._next_push_pull = now + self.config.push_pull_period(self._live)
        addr = self._push_pull_target()
        if addr is not None:
            outs.append((addr, self._push_pull_msg(reply=False, join=False)))

    def _push_pull_target(self) -> str | None:
        alive = [n for n in self._live_names() if self._members[n].state == State.ALIVE]
        dead = [n for n, m in self._members.items() if m.state == State.DEAD]
        # Serf's reconnect: the more of the group is dead, the likelier we try a dead one.
        if dead and self._rng.random() * (len(alive) + len(dead)) < len(dead):
            return self._members[self._rng.choice(dead)].addr
        if alive:
            return self._members[self._rng.choice(alive)].addr
        if self._seeds:
            return self._rng.choice(self._seeds)
        return None

    def _push_pull_msg(self, *, reply: bool, join: bool) -> dict[str, Any]:
        members = [
            [m.name, m.addr, m.incarnation, int(m.state), *([m.meta] if m.meta else [])]
            for m in self._members.values()
        ]
        return self._env("push_pull", members=members, reply=reply, join=join)

    def _self_alive(self) -> Update:
        return _alive(self.name, self.addr, self.incarnation, self.meta)

    def _env(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "from": self.name,
            "addr": self.addr,
            "inc": self.incarnation,
            **_meta_field(self.meta),
            **fields,
        }


def _meta_field(meta: str) -> dict[str, str]:
    return {"meta": meta} if meta else {}


def _alive(name: str, addr: str, inc: int, meta: str) -> Update:
    return {"kind": "alive", "name": name, "addr": addr, "inc": inc, **_meta_field(meta)}
