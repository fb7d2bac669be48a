"""Applying a chaos plan: the driver, the targets it acts on, `gossip-train chaos`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2p.framing import MsgType
from p2p.secure import Keyring
from p2p.transport import TransportError, parse_addr

from .netns import FaultNet, NamespaceNet, NetError
from .scenario import (
    NETWORK_KINDS,
    Action,
    Scenario,
    ScenarioError,
    load_scenario,
    plan,
    scenario_from_flags,
)

log = logging.getLogger(__name__)


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
    addr: str,
    header: dict[str, Any],
    cluster: str = "gossip-train",
    timeout: float = 3.0,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """One CONTROL command to a peer started with --allow-control; its CONTROL_OK header."""
    from ..status import request

    reply = await request(addr, MsgType.CONTROL, header, cluster, timeout, "control", keyring)
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
    keyring: Keyring | None = None
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
        header: dict[str, Any]
        if a.kind in ("poison", "unpoison"):
            header = {"op": "poison", "mode": a.mode if a.kind == "poison" else "none"}
            if a.kind == "poison" and a.factor is not None:
                header["factor"] = a.factor
        else:
            header = {"op": "slowdown", "factor": a.factor if a.kind == "slow-peer" else 1.0}
        reply = await send_control(t.control_addr(name), header, self.cluster, keyring=self.keyring)
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


def chaos_keyring(args: Any) -> Keyring | None:
    """--secret-file, else the secret a `local` run made for itself (RUN_DIR/secret)."""
    path = getattr(args, "secret_file", None)
    if path is None and getattr(args, "run_dir", None):
        run_secret = Path(args.run_dir) / "secret"
        path = str(run_secret) if run_secret.is_file() else None
    return Keyring.from_file(path) if path else None


def run_chaos(args: Any) -> int:
    """``gossip-train chaos``: apply a scenario to peers that are already running."""
    from ..runtime import run_async
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
    run_async(Driver(actions, target, args.cluster, chaos_keyring(args)).run())
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
        "--netns-rate",
        metavar="RATE",
        help="with --netns, cap every peer's link at RATE (a tc rate: 10mbit, 100mbit) in "
        "each direction from the start, with tc tbf on both ends of its veth pair",
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
        help="peers accept slow-peer and poison commands from `gossip-train chaos` (on with "
        "--chaos)",
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
        "--secret-file",
        metavar="FILE",
        help="the swarm's keyring (default: RUN_DIR/secret, the one a `local` run made)",
    )
    p.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="remove namespaces and links that killed runs left behind, then go on",
    )
    _add_fault_args(p, file_flag=False)
