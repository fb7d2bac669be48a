"""``gossip-train local``: N peer processes on 127.0.0.1, a live view, a summary.

Each peer is a ``gossip-train peer`` process (the same code users run across machines),
speaking real TCP on loopback. The launcher only starts them, reads the JSON events they
print, shows progress, and at the end builds the consensus model from their final weights.

With ``--netns`` every peer is a host of its own: a network namespace with its own IP
address on a bridge (``trainer.chaos.netns``), its link capped with ``--netns-rate``. With
``--chaos`` / ``--fault`` / ``--random`` the launcher also injects faults (``trainer.chaos``),
through the namespaces or, without them, through a TCP proxy in this process; afterwards it
writes the robustness report (``trainer.chaos.report``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.events import EventFile
from p2p.secure import Keyring, write_secret

from ..chaos.driver import Driver, check_target
from ..chaos.netns import (
    FaultNet,
    NamespaceNet,
    NetError,
    NetnsConfig,
    netns_available,
    parse_rate,
)
from ..chaos.proxy import ProxyNet
from ..chaos.scenario import Action, Scenario, load_scenario, plan, scenario_from_flags
from ..config import ENV_PREFIX, LaunchConfig, default_threads, save_config
from ..flags import REPORT_ENV, peer_config
from ..runtime import UserError
from . import summary as run_summary
from .view import StepRate, eta_seconds, format_eta, format_rate, format_value, headline
from .zygote import EventPipe, Zygote, ZygoteChild, ZygoteError, become_subreaper

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0
# Port every peer listens on inside its own namespace (each namespace has its own ports).
NETNS_PORT = 7000
# Default --linger of a run with faults (seconds); 2 s without.
CHAOS_LINGER = LaunchConfig.chaos_linger
# Seconds a launched peer keeps trying the peers started before it.
LAUNCH_JOIN_TIMEOUT = 60.0


@dataclass
class Child:
    index: int
    name: str
    addr: str
    run_dir: Path
    proc: asyncio.subprocess.Process | ZygoteChild | None = None
    last: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    status: str = "starting"
    started: float = 0.0
    restarts: int = 0
    listen: str | None = None  # bind address when it differs from the advertised ``addr``
    control: str = ""  # where CONTROL commands reach the peer directly (not via the proxy)
    wrap: list[str] = field(default_factory=list)  # argv prefix (ip netns exec NS)
    chaos_killed: bool = False  # the last exit was a fault we injected
    restart_now: bool = False  # restart at once after the injected SIGKILL
    events: EventPipe | None = None  # where its JSON events arrive (a copy, best effort)
    last_eval: dict[str, Any] | None = None  # its last "eval" event (the live view)
    rate: StepRate = field(default_factory=StepRate)  # its steps per second, recently
    metrics_port: int = 0  # --metrics: where it serves Prometheus metrics (0: off)


# Where the peers' own ports are drawn from: below the kernel's ephemeral range, which
# outgoing connections and the proxy's fronts (bound to port 0) take theirs from. A port
# drawn from that range (bind to 0, close) could be handed out again, to a proxy front or
# to an earlier peer's outgoing connection, before its own peer listened on it ("Address
# already in use", seen once in a chaos test through the proxy).
PORT_FLOOR = 10000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 if it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` now, below the ephemeral range where it leaves room (else
    ephemeral ones, as the kernel hands them out)."""
    low = ephemeral_low()
    if low - PORT_FLOOR >= 64 * max(1, n):
        rng = random.Random()
        found: list[int] = []
        for port in rng.sample(range(PORT_FLOOR, low), min(low - PORT_FLOOR, 64 * n)):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue  # taken: another process listens there
            found.append(port)
            if len(found) == n:
                return found
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_metrics_ports(base: int, n: int, host: str = "127.0.0.1") -> list[int]:
    """The ports of ``--metrics BASE_PORT``, one per peer: in range and free now, or one
    line saying which is not (before any peer starts)."""
    from ..metrics import require

    require("--metrics")
    if not (1 <= base and base + n - 1 <= 65535):
        raise UserError(
            f"--metrics {base}: {n} peers need ports {base}..{base + n - 1}; "
            "a port must be in 1..65535"
        )
    ports = list(range(base, base + n))
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise UserError(f"--metrics {base}: port {port} of {host} ({why})") from None
    return ports


def metrics_url(child: Child) -> str:
    """Where ``child`` serves its metrics: its listen host, or its advertised one when it
    listens on every address (a namespace's peer)."""
    host = (child.listen or child.addr).rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", "::"):
        host = child.addr.rsplit(":", 1)[0]
    return f"http://{host}:{child.metrics_port}/metrics"


def peer_config_for(args: argparse.Namespace, child: Child, n: int, seeds: list[str]) -> Any:
    """The complete PeerConfig of one launched peer: the run's flags (the same translation
    `gossip-train peer` uses) plus where this peer stands. Written to its config.json."""
    base = peer_config(args)
    supervised = args.checkpoints or args.restart_failed
    checkpoint = base.checkpoint
    if supervised:
        checkpoint = dataclasses.replace(checkpoint, directory=str(child.run_dir / "checkpoints"))
    return dataclasses.replace(
        base,
        listen=child.listen or child.addr,
        advertise=child.addr if child.listen else None,
        join=tuple(seeds),
        name=child.name,
        index=child.index,
        num_peers=n,
        run_dir=str(child.run_dir),
        # Its seeds were started a moment ago and may still be importing on a loaded box;
        # a restarted peer's have been up for a while (one that does not answer is gone).
        join_timeout=base.join_timeout
        if child.restarts
        else max(base.join_timeout, LAUNCH_JOIN_TIMEOUT),
        # The whole run trains together: a short run on a slow box must not end on peer-0
        # before the last copy has imported torch. A restarted peer joins whoever is left.
        wait_peers=(1 if child.restarts else n) if base.wait_peers == 0 else base.wait_peers,
        linger_seconds=LaunchConfig.linger if args.linger is None else args.linger,
        allow_control=bool(getattr(args, "allow_control", False)),
        metrics_port=child.metrics_port,
        # Peers run in their own folders: a relative DIR means the launcher's.
        tensorboard=str(Path(args.tensorboard).resolve()) if base.tensorboard else None,
        checkpoint=checkpoint,
        train=dataclasses.replace(base.train, threads=args.threads or default_threads(n)),
    )


def script_env(child: Child, n: int, config: Path, events_fd: int, threads: int) -> dict[str, str]:
    """The environment of one copy of a `gossip-train run` script: torchrun's variables
    (so existing sharding code works), and where GossipOptimizer finds its settings."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "RANK": str(child.index),
        "WORLD_SIZE": str(n),
        "LOCAL_RANK": str(child.index),
        "LOCAL_WORLD_SIZE": str(n),
        ENV_PREFIX + "CONFIG": str(config),
        ENV_PREFIX + "EVENTS_FD": str(events_fd),
        ENV_PREFIX + "THREADS": str(threads),
    }


class LocalRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # `gossip-train run`: the user's script with its arguments instead of `peer`.
        self.script: list[str] | None = getattr(args, "script", None)
        n = args.peers
        if n < 1:
            raise ValueError("--peers must be at least 1")
        names = [f"peer-{i}" for i in range(n)]
        # A bad scenario, or a fault aimed at a peer that does not exist, fails here,
        # before anything is created or started.
        self.scenario = load_chaos(args)
        self.actions: list[Action] = plan(self.scenario, names, args.chaos_seed)
        self.mode = network_mode(args, self.scenario)
        if getattr(args, "netns_rate", None) and self.mode != "netns":
            raise ValueError("--netns-rate needs --netns (each peer's link is a veth pair)")
        args.allow_control = bool(self.actions) or getattr(args, "allow_control", False)
        if self.actions and args.linger is None:
            # Faults make peers finish at different times (a restarted peer redoes the
            # steps since its checkpoint); lingering longer lets the early ones keep
            # averaging with the late ones, so all end near the consensus.
            args.linger = CHAOS_LINGER
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(args.run_dir or f"runs/{stamp}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if getattr(args, "secret_file", None):
            Keyring.from_file(args.secret_file)  # a bad file fails here, once
        else:
            # A secret of this run's own: its peers admit each other and nobody else.
            args.secret_file = str(write_secret(self.run_dir / "secret"))
        ports = list(range(args.base_port, args.base_port + n)) if args.base_port else free_ports(n)
        self.children = [
            Child(i, names[i], f"127.0.0.1:{ports[i]}", self.run_dir / f"peer-{i}")
            for i in range(n)
        ]
        for c in self.children:
            c.control = c.addr
        if getattr(args, "tensorboard", None):
            from ..board import require

            require()
        if getattr(args, "metrics", None) is not None:
            # Namespaces have ports of their own: only loopback peers can collide here.
            host_check = not getattr(args, "netns", False)
            metric_ports = (
                check_metrics_ports(args.metrics, n)
                if host_check
                else list(range(args.metrics, args.metrics + n))
            )
            for c, port in zip(self.children, metric_ports, strict=True):
                c.metrics_port = port
        self.names = names
        self.net: FaultNet | None = None
        self.t0 = time.time()
        self.log_file = EventFile(self.run_dir / run_summary.LAUNCHER_EVENTS)
        self.tty = sys.stderr.isatty() and not args.no_progress
        self.stopping = False
        self._drawn = 0
        self._waiters: set[asyncio.Task[None]] = set()
        self._all_started = asyncio.Event()
        self.driver: Driver | None = None
        self.zygote: Zygote | None = None
        self.summarized = False  # summary.json written by a zygote child
        self.wall: float | None = None

    # -- networks ------------------------------------------------------------------------------
    def make_namespaces(self) -> NamespaceNet:
        """Every peer on a host of its own: a namespace, an IP, the same port on each."""
        ok, why = netns_available()
        if not ok:
            raise NetError(f"--netns: {why}")
        sysctls = tuple(getattr(self.args, "netns_sysctl", None) or ())
        rate = getattr(self.args, "netns_rate", None)
        if rate:
            try:
                parse_rate(rate)
            except ValueError as exc:
                raise NetError(f"--netns-rate: {exc}") from None
        net = NamespaceNet(len(self.children), NetnsConfig(sysctls=sysctls))
        self.net = net
        net.guard()
        net.create()
        if rate:
            for c in self.children:  # before any peer starts: every byte crosses the cap
                net.cap(c.index, rate)
        port = self.args.base_port or NETNS_PORT
        for c in self.children:
            c.addr = c.control = f"{net.ip(c.index)}:{port}"
            c.listen = f"0.0.0.0:{port}"
            c.wrap = net.exec_argv(c.index)
        return net

    async def _make_proxy(self) -> None:
        """No namespaces: each peer advertises a proxy front; the proxy forwards to it."""
        keyring = Keyring.from_file(self.args.secret_file) if self.args.secret_file else None
        proxy = ProxyNet(self.names, [c.addr for c in self.children], keyring=keyring)
        fronts = await proxy.start()
        self.net = proxy
        for c, front in zip(self.children, fronts, strict=True):
            c.listen, c.addr, c.control = c.addr, front, c.addr

    def write_run(self) -> None:
        """RUN_DIR/run.json: what `gossip-train summary` needs to rebuild this run's summary."""
        chaos = None
        if self.actions:
            chaos = {"seed": self.chaos_seed, "plan": [a.to_json() for a in self.actions]}
        run_summary.start_run(
            self.run_dir,
            {
                "config": {k: v for k, v in vars(self.args).items() if k != "func"},
                "script": bool(self.script),
                "peers": [
                    {"name": c.name, "addr": c.addr, "dir": c.run_dir.name} for c in self.children
                ],
                "network": self.net.describe() if self.net is not None else {"mode": self.mode},
                "chaos": chaos,
                "metrics": self.write_metrics(),
            },
            ts=self.t0,
        )

    def write_metrics(self) -> dict[str, str] | None:
        """--metrics: RUN_DIR/metrics.json (peer name -> URL) and
        RUN_DIR/prometheus-targets.json (Prometheus file_sd, see examples/prometheus.yml)."""
        if not any(c.metrics_port for c in self.children):
            return None
        urls = {c.name: metrics_url(c) for c in self.children}
        targets = [
            {
                "targets": [url.split("/")[2]],
                "labels": {"peer": name, "run": self.run_dir.name},
            }
            for name, url in urls.items()
        ]
        run_summary.write_json(self.run_dir / "metrics.json", urls)
        run_summary.write_json(self.run_dir / "prometheus-targets.json", targets)
        return urls

    def write_peers(self) -> None:
        """RUN_DIR/peers.json: what `gossip-train chaos --run-dir` needs to act on this run."""
        info = {
            "launcher_pid": os.getpid(),
            "net": self.net.describe() if self.net is not None else {"mode": self.mode},
            "restart_failed": bool(self.args.restart_failed),
            "peers": [
                {
                    "name": c.name,
                    "index": c.index,
                    "addr": c.addr,
                    "control": c.control,
                    "pid": c.proc.pid if c.proc and c.proc.returncode is None else None,
                    "netns": c.wrap[-1] if c.wrap else None,
                }
                for c in self.children
            ],
        }
        tmp = self.run_dir / "peers.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.run_dir / "peers.json")

    # -- events --------------------------------------------------------------------------------
    def event(self, child: Child, ev: dict[str, Any]) -> None:
        """One event from a peer's channel: for the live view only (its file has it all)."""
        kind = ev.get("kind")
        if kind == "progress":
            child.last = ev
            if isinstance(ev.get("ts"), (int, float)) and isinstance(ev.get("step"), int):
                child.rate.add(ev["ts"], ev["step"])
        elif kind == "eval":
            child.last_eval = ev
        elif kind == "finished":
            child.result = ev
        elif kind == "started":
            child.status = "training"
            if all(c.status == "training" for c in self.children):
                self._all_started.set()

    async def _read(self, child: Child) -> None:
        assert child.events is not None
        while True:
            line = await child.events.readline()
            if not line:
                return
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.event(child, ev)

    async def _start(self, child: Child, seeds: list[str]) -> None:
        child.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = peer_config_for(self.args, child, len(self.children), seeds)
        config = save_config(cfg, child.run_dir / "config.json")
        if self.script:
            await self._start_script(child, config, cfg.train.threads)
        else:
            await self._start_peer(child, config)
        child.started = time.time()
        child.chaos_killed = False
        self.note(child, "spawned", pid=child.proc.pid if child.proc is not None else None)
        self.write_peers()

    def _zygote_ok(self) -> bool:
        z = self.zygote
        if z is not None and not z.alive:
            self._zygote_gone(z)
        return self.zygote is not None

    def _zygote_gone(self, z: Zygote) -> None:
        if self.zygote is not z:
            return
        self.zygote = None
        self.note(None, "zygote_exited", returncode=z.returncode)
        print(
            "gossip-train: the peer zygote exited; running peers go on, restarts start fresh "
            "processes",
            file=sys.stderr,
        )

    async def _start_peer(self, child: Child, config: Path) -> None:
        """A `gossip-train peer --config CONFIG` process: forked from the zygote while it
        lives, else a fresh one. Its events come on a pipe of their own (best effort: the
        peer never waits on it); its stdout and stderr go to log.txt."""
        log_path = child.run_dir / "log.txt"
        if self._zygote_ok():
            assert self.zygote is not None
            try:
                child.proc, child.events = await self.zygote.spawn(str(config), str(log_path))
                return
            except ZygoteError as exc:
                log.warning("zygote spawn failed (%s); starting a fresh process", exc)
                self._zygote_ok()
        read_fd, write_fd = os.pipe()
        argv = [*child.wrap, sys.executable, "-m", "trainer.cli", "peer", "--config", str(config)]
        argv += ["--events-fd", str(write_fd)]
        child.proc = await self._exec(argv, log_path, write_fd, {})
        child.events = await EventPipe.open(read_fd)

    async def _start_script(self, child: Child, config: Path, threads: int) -> None:
        """`gossip-train run`: the user's script, told where its settings are by its
        environment; its events come back on a pipe of their own."""
        assert self.script is not None
        read_fd, write_fd = os.pipe()
        env = script_env(child, len(self.children), config, write_fd, threads)
        argv = [*child.wrap, sys.executable, *self.script]
        child.proc = await self._exec(argv, child.run_dir / "log.txt", write_fd, env)
        child.events = await EventPipe.open(read_fd)

    async def _exec(
        self, argv: list[str], log_path: Path, events_fd: int, env: dict[str, str]
    ) -> asyncio.subprocess.Process:
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
                pass_fds=(events_fd,),
                start_new_session=True,
            )
        finally:
            log.close()
            os.close(events_fd)

    def _seeds_for(self, child: Child) -> list[str]:
        """Whom a restarted peer joins through: every other peer but those that finished
        (they will not answer again; a killed one may be back by then). None left: it
        starts alone at once rather than wait out the join timeout for nobody."""
        return [c.addr for c in self.children if c is not child and not self._finished(c)]

    @staticmethod
    def _finished(child: Child) -> bool:
        proc = child.proc
        return proc is not None and proc.returncode == 0 and bool(child.result)

    async def _wait(self, child: Child) -> None:
        """Wait for the child to end; with --restart-failed, restart it while it crashes."""
        while True:
            assert child.proc is not None
            reader = asyncio.create_task(self._read(child))
            rc = await child.proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await reader
            reader.cancel()
            if child.events is not None:
                child.events.close()
            if rc == 0 and child.result:
                child.status = str(child.result.get("status", "finished"))
                return
            child.status = "killed" if child.chaos_killed else "failed"
            self.note(child, "exited", returncode=rc, chaos=child.chaos_killed)
            if child.restart_now and not self.stopping:
                child.restart_now = False  # an injected restart: at once, supervised or not
            # Exit status 2 is a user error (bad flags, data): restarting cannot fix it.
            elif not self.args.restart_failed or rc == 2 or self.stopping:
                return
            elif child.restarts >= getattr(self.args, "max_restarts", 10):
                self.note(child, "gave_up", restarts=child.restarts)
                print(
                    f"gossip-train: {child.name} failed {child.restarts + 1} times; "
                    "not restarting it again (--max-restarts)",
                    file=sys.stderr,
                )
                return
            else:
                await asyncio.sleep(self.args.restart_delay)
            if self.stopping:
                return
            child.restarts += 1
            await self._start(child, self._seeds_for(child))
            self.note(child, "restarted", restarts=child.restarts)

    def _watch(self, child: Child) -> None:
        task = asyncio.create_task(self._wait(child))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    def note(self, child: Child | None, kind: str, **fields: Any) -> None:
        """One of the launcher's own events, appended to RUN_DIR/launcher.jsonl."""
        ev = {"ts": round(time.time(), 6), "kind": kind, **fields}
        if child is not None:
            ev["peer"] = child.name
        self.log_file(ev)

    # -- the chaos target (trainer.chaos.driver.Target) --------------------------------------
    def _child(self, name: str) -> Child:
        return self.children[self.names.index(name)]

    def _running(self, child: Child) -> bool:
        return child.proc is not None and child.proc.returncode is None

    def kill(self, name: str) -> dict[str, Any]:
        child = self._child(name)
        if not self._running(child):
            return {"skipped": "not running"}
        assert child.proc is not None
        child.chaos_killed = True
        os.killpg(child.proc.pid, signal.SIGKILL)
        return {"pid": child.proc.pid}

    def restart(self, name: str) -> dict[str, Any]:
        """SIGKILL, then start again with the same arguments: it resumes from its checkpoint."""
        child = self._child(name)
        if self._running(child):
            child.restart_now = True
            return self.kill(name)
        if child.status not in ("killed", "failed"):
            return {"skipped": f"not running ({child.status})"}
        task = asyncio.get_running_loop().create_task(self._revive(child))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)
        return {"note": "was not running; started again"}

    async def _revive(self, child: Child) -> None:
        child.restarts += 1
        await self._start(child, self._seeds_for(child))
        self.note(child, "restarted", restarts=child.restarts)
        await self._wait(child)

    def signal(self, name: str, sig: int) -> dict[str, Any]:
        child = self._child(name)
        if not self._running(child):
            return {"skipped": "not running"}
        assert child.proc is not None
        os.killpg(child.proc.pid, sig)
        return {"pid": child.proc.pid}

    def control_addr(self, name: str) -> str:
        return self._child(name).control

    def record(self, event: dict[str, Any]) -> None:
        self.note(None, **event)
        desc = " ".join(
            f"{k}={v}" for k, v in event.items() if k in ("fault", "peers", "groups", "error")
        )
        print(f"t={time.time() - self.t0:6.1f}s  {event['kind']}: {desc}", file=sys.stderr)

    async def _chaos(self) -> None:
        """Start the clock when every peer trains, then apply the planned actions."""
        await self._all_started.wait()
        self.note(None, "chaos_start", mode=self.mode, seed=self.chaos_seed)
        keyring = Keyring.from_file(self.args.secret_file) if self.args.secret_file else None
        self.driver = Driver(self.actions, self, self.args.cluster or "gossip-train", keyring)
        await self.driver.run()

    @property
    def chaos_seed(self) -> int:
        return self.scenario.seed if self.args.chaos_seed is None else self.args.chaos_seed

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> None:
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            assert main is not None
            # One path for both, the loop's own handler: a SIGINT left to asyncio.Runner's
            # Python-level handler once went unanswered for 60 s just after the peers were
            # spawned (once, in a full local run of the suite; not reproduced since); SIGTERM's
            # path never has.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, main.cancel)
        # Orphans (a dead zygote's peers) become ours, so we collect how they end.
        become_subreaper()
        zygote = self.mode != "netns" and not getattr(self.args, "no_zygote", False)
        if zygote and not self.script:
            # A peer in a namespace must be exec'd there; everywhere else, fork them warm.
            # A bad --data-dir fails here, once, before any peer or network exists.
            self.zygote = Zygote()
            self.zygote.on_exit = self._zygote_gone
            await self.zygote.start(
                self.args.dataset or "default", self.args.data_dir, self.args.task
            )
        if self.mode == "proxy":
            await self._make_proxy()
        check_target(self.actions, self.net, "--chaos")
        self.write_run()
        self.note(None, "network", mode=self.mode, peers={c.name: c.addr for c in self.children})
        for c in self.children:
            # Every later peer may join through any earlier one: the first that answers wins.
            await self._start(c, [p.addr for p in self.children[: c.index]])
        view = asyncio.create_task(self._view())
        chaos = asyncio.create_task(self._chaos()) if self.actions else None
        try:
            async with asyncio.timeout(self.args.timeout):
                for c in self.children:
                    self._watch(c)
                while self._waiters:
                    await asyncio.wait(set(self._waiters))
        except TimeoutError:
            self.note(None, "timeout")
        finally:
            view.cancel()
            if chaos is not None:
                chaos.cancel()
            await self.stop_all()
            await self._settle()
            if isinstance(self.net, ProxyNet):
                await self.net.close()
            if self.zygote is not None:
                await self._summarize_in_zygote()
                await self.zygote.close()
            self._draw(final=True)

    async def _summarize_in_zygote(self) -> None:
        """The summary and consensus need torch: the zygote has it loaded, so a child of it
        builds them in a fraction of the time this process would need to import it."""
        assert self.zygote is not None
        self.wall = time.time() - self.t0
        self.log_file.close()  # everything the launcher knows is on disk
        if any(c.result for c in self.children):
            # Its own output goes to summary.log: say here what the wait is for.
            print("consensus: averaging the final models and evaluating them", file=sys.stderr)
        try:
            rc = await self.zygote.summarize(
                str(self.run_dir), self.wall, str(self.run_dir / "summary.log")
            )
        except (ZygoteError, OSError) as exc:
            log.warning("summary in the zygote failed (%s); building it here", exc)
            return
        self.summarized = rc == 0

    async def _settle(self) -> None:
        """Let the waiters read the stopped peers' last events, then drop them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                while self._waiters:
                    await asyncio.wait(set(self._waiters))
        for task in list(self._waiters):
            task.cancel()

    async def stop_all(self) -> None:
        self.stopping = True
        if self.net is not None:
            with contextlib.suppress(NetError, OSError):
                self.net.heal()
        live = [c for c in self.children if c.proc and c.proc.returncode is None]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                assert c.proc is not None
                os.killpg(c.proc.pid, signal.SIGTERM)
                os.killpg(c.proc.pid, signal.SIGCONT)  # a paused peer must see the SIGTERM
        deadline = time.time() + GRACE_SECONDS
        for c in live:
            assert c.proc is not None
            try:
                async with asyncio.timeout(max(0.1, deadline - time.time())):
                    await c.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                await c.proc.wait()

    # -- live view ----------------------------------------------------------------------
    async def _view(self) -> None:
        while True:
            await asyncio.sleep(0.5 if self.tty else 5.0)
            if not self.args.no_progress:
                self._draw()

    def _rows(self) -> list[str]:
        return view_rows(self.children)

    def _eta(self) -> float | None:
        """Seconds until the slowest training peer takes its last step (None: unknown)."""
        etas = [_child_eta(c) for c in self.children if c.status == "training"]
        known = [e for e in etas if e is not None]
        return max(known) if known and len(known) == len(etas) else None

    def _draw(self, final: bool = False) -> None:
        if self.args.no_progress and not final:
            return
        eta = "" if final else f"  ETA {format_eta(self._eta())}"
        rows = [f"t={time.time() - self.t0:6.1f}s{eta}  run dir {self.run_dir}", *self._rows()]
        if self.tty:
            if self._drawn:
                sys.stderr.write(f"\x1b[{self._drawn}F\x1b[J")
            sys.stderr.write("\n".join(rows) + "\n")
            self._drawn = len(rows)
        elif not final:
            done = sum(c.last.get("step", 0) for c in self.children)
            total = sum(c.last.get("total", 0) for c in self.children) or 1
            ex = sum(c.last.get("exchanges", 0) for c in self.children)
            rate = sum(c.rate.per_second or 0.0 for c in self.children if c.status == "training")
            sys.stderr.write(
                f"t={time.time() - self.t0:6.1f}s  {100 * done / total:5.1f}% of "
                f"steps, {ex} exchanges, {format_rate(rate)} steps/s, "
                f"ETA {format_eta(self._eta())}\n"
            )
        sys.stderr.flush()


def _child_eta(c: Child) -> float | None:
    return eta_seconds(c.last.get("step", 0), c.last.get("total"), c.rate.per_second)


def view_rows(children: list[Child]) -> list[str]:
    """The live table: a row per peer, at most 88 characters wide.

    The headline metric (its column named after it) is the peer's last evaluation's first
    metric, "-" before any (--eval-every); st/s is steps per second over the last seconds;
    alive is how many members the peer sees alive; wts%: the share of its bytes out that
    carried weights (the rest is membership and control: the overhead a slow link pays for).
    """
    label = next((k for c in children if (k := headline(c.last_eval)[0])), None) or "metric"
    rows = [
        f"{'peer':<8} {'status':<9} {'step':>11} {'loss':>7} {label[:8]:>8} {'st/s':>6} "
        f"{'eta':>6} {'exch':>5} {'alive':>5} {'MB out':>7} {'wts%':>5}"
    ]
    for c in children:
        ev = c.last
        step = f"{ev.get('step', 0)}/{ev.get('total', '?')}"
        loss = ev.get("loss")
        training = c.status == "training"
        eta = format_eta(_child_eta(c)) if training else "-"
        rate = format_rate(c.rate.per_second) if training else "-"
        rows.append(
            f"{c.name[:8]:<8} {c.status:<9} {step:>11} "
            f"{(f'{loss:.3f}' if isinstance(loss, float) else '-'):>7} "
            f"{format_value(headline(c.last_eval)[1]):>8} {rate:>6} {eta:>6} "
            f"{ev.get('exchanges', 0):>5} {ev.get('alive', 0):>5} "
            f"{ev.get('bytes_sent', 0) / 1e6:>7.1f} "
            f"{_percent(run_summary.share(ev.get('bytes')))}"
        )
    return rows


def finish(run: LocalRun, wall: float) -> dict[str, Any]:
    """Consensus model, summary.json and progress.jsonl, from the run's files."""
    run.log_file.close()
    if run.summarized:
        return json.loads((run.run_dir / "summary.json").read_text())
    return run_summary.write(run.run_dir, wall)


def load_chaos(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(args.chaos) if getattr(args, "chaos", None) else Scenario()
    return scenario + scenario_from_flags(
        getattr(args, "fault", None) or [], getattr(args, "random", None) or []
    )


def network_mode(args: argparse.Namespace, scenario: Scenario) -> str:
    """netns when asked; the proxy when asked or when network faults need it; else loopback."""
    if getattr(args, "netns", False):
        return "netns"
    if getattr(args, "proxy", False) or scenario.network:
        return "proxy"
    return "loopback"


def _percent(x: float | None) -> str:
    """A share in a 5-wide cell, to a tenth of a percent: on a fast link membership and
    control are a fraction of a percent, and "100" would hide them."""
    return f"{'-' if x is None else format(100 * x, '.1f'):>5}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _kb(kinds: dict[str, dict[str, int]] | None, kind: str) -> str:
    """``kind``'s kilobytes both ways, in a 7-wide cell."""
    way = (kinds or {}).get(kind)
    kb = None if way is None else (way["sent"] + way["received"]) / 1e3
    return f"{'-' if kb is None else format(kb, '.1f'):>7}"


def traffic_line(summary: dict[str, Any]) -> str | None:
    """The run's bytes by kind, sent by all peers, and the payloads' compression."""
    total = summary.get("bytes")
    if not total:
        return None
    kinds = ", ".join(f"{kind} {_size(way['sent'])}" for kind, way in total.items())
    ratio = summary.get("compression_ratio")
    return f"sent by kind: {kinds}; weight payloads compressed {ratio or 1.0:.2f}x"


def print_table(summary: dict[str, Any], run_dir: Path) -> None:
    """Each peer's headline metric (the first its task reports), steps, exchanges, traffic
    (wts%: the share of its bytes out that carried weights; memb KB: membership both ways)."""
    found = [p["metrics"] for p in summary["peers"] if p.get("metrics")]
    key = next(iter(found[0])) if found else None
    label = (key or "metric")[:10]
    print(
        f"{'peer':<8} {'status':<9} {label:>10} {'steps':>6} {'exch':>5} {'MB out':>7} "
        f"{'MB in':>7} {'wts%':>5} {'memb KB':>7} {'seconds':>7}"
    )
    for p in summary["peers"]:
        value = (p.get("metrics") or {}).get(key) if key else None
        print(
            f"{p['name']:<8} {p['status']:<9} "
            f"{(f'{value:.4f}' if value is not None else '-'):>10} {p['steps'] or 0:>6} "
            f"{p['exchanges'] or 0:>5} {(p['bytes_sent'] or 0) / 1e6:>7.1f} "
            f"{(p['bytes_received'] or 0) / 1e6:>7.1f} "
            f"{_percent(run_summary.share(p.get('bytes')))} {_kb(p.get('bytes'), 'membership')} "
            f"{p['wall_seconds'] or 0:>7.1f}"
        )
    traffic = traffic_line(summary)
    if traffic:
        print(traffic)
    cons = summary.get("consensus_metrics") or {}
    if summary.get("consensus_model"):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in cons.items()) or "not evaluated"
        print(f"consensus model: {shown} -> {summary['consensus_model']}")
    print(f"wall time {summary['wall_seconds']:.1f} s; summary: {run_dir / 'summary.json'}")


def run_local(args: argparse.Namespace) -> int:
    from ..flags import SLURM_OFF_ENV
    from ..runtime import run_async

    # Inside a Slurm job our peers would otherwise take SLURM_PROCID & co. for their own.
    os.environ[SLURM_OFF_ENV] = "0"
    baseline = run_baseline(args)
    run = LocalRun(args)
    t0 = time.time()
    try:
        if run.mode == "netns":
            net = run.make_namespaces()
            print(f"network: namespaces {net.describe()}", file=sys.stderr)
        elif run.mode == "proxy":
            print("network: fault-injecting TCP proxy on 127.0.0.1 (no --netns)", file=sys.stderr)
        run_async(run.run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        run_async(run.stop_all())
        raise KeyboardInterrupt from None
    finally:
        if isinstance(run.net, NamespaceNet):
            run.net.close()
    summary = finish(run, time.time() - t0)
    print_table(summary, run.run_dir)
    if run.actions or baseline is not None:
        from ..chaos.report import write_report

        report = write_report(run.run_dir, baseline, epsilon=args.epsilon)
        verdict = "all invariants hold" if report["invariants_ok"] else "INVARIANTS FAIL"
        print(f"robustness report: {run.run_dir / 'report.md'} ({verdict})")
    if args.report and os.environ.get(REPORT_ENV, "1") != "0":
        from ..report import write_after_run

        page = write_after_run(run.run_dir)  # after report.json: the page shows its tables
        if page is not None:
            print(f"report: {page}")
    failed = [p for p in summary["peers"] if p["status"] not in ("finished", "killed")]
    for p in failed:
        print(f"gossip-train: {p['name']} {p['status']}: {p.get('error') or '?'}", file=sys.stderr)
    return 1 if failed else 0


def run_baseline(args: argparse.Namespace) -> Path | None:
    """--baseline DIR: an earlier no-fault run; --baseline auto: run it now, same seed."""
    if not getattr(args, "baseline", None):
        return None
    if args.baseline != "auto":
        path = Path(args.baseline)
        if not (path / "summary.json").is_file():
            raise ValueError(f"--baseline {path}: no summary.json there")
        return path
    base = argparse.Namespace(**vars(args))
    base.chaos, base.fault, base.random, base.baseline = None, None, None, None
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    args.run_dir = str(run_dir)
    base.run_dir = str(run_dir / "baseline")
    print(f"baseline: running it first, without faults, in {base.run_dir}", file=sys.stderr)
    if run_local(base) != 0:
        raise ValueError("the baseline run failed; see its peer logs")
    return Path(base.run_dir)
