"""Live metrics of one peer for Prometheus (``gossip-train peer --metrics-port PORT``).

Each peer serves its own registry (never ``prometheus_client``'s global one: a process may
hold several peers, in tests or under ``GossipOptimizer``) at ``http://HOST:PORT/metrics``,
HOST being the peer's listen host. The server is an asyncio handler on the peer's own event
loop: a scrape reads the agent's counters on the thread that writes them, so it needs no
locks, and each request is bounded in size, time and number at once.

Most values are read when scraped (steps, exchanges, bytes, members, checkpoint age); what
only events tell (the last evaluation, suspicions) comes through an ``Events`` tap, and the
latency of each exchange through ``Agent.on_exchange``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from gossip.exchange import EXCHANGE_COUNTS, Outcome

from .runtime import UserError

log = logging.getLogger(__name__)

INSTALL = "pip install 'gossip-train[metrics]'"
# Exchange latency buckets (seconds): loopback exchanges of small models take milliseconds,
# large models over slow links tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A scrape request: its head at most this long, read within REQUEST_TIMEOUT; at most
# MAX_CLIENTS at once (more are closed unanswered).
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 8
STATES = ("alive", "suspect", "dead", "left")


def require(flag: str = "--metrics-port") -> None:
    """Fail in one line, before anything starts, when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} needs the prometheus_client package: {INSTALL}") from None


def check_port(port: int, flag: str = "--metrics-port") -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"{flag} {port}: a port must be in 1..65535")


class PeerMetrics:
    """One peer's registry. ``peer`` is a ``trainer.peer.Peer`` (read, never changed)."""

    def __init__(self, peer: Any) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.peer = peer
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "gossip_train_exchange_seconds",
            "Wall time of the exchanges this peer started and completed",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.suspicions = 0
        self.eval_metrics: dict[str, float] = {}
        self.eval_step: int | None = None
        self.registry.register(_Collector(self))

    def on_event(self, event: dict[str, Any]) -> None:
        """An ``Events`` tap: what only events say."""
        kind = event.get("kind")
        if kind == "suspect":
            self.suspicions += 1
        elif kind == "eval" and isinstance(event.get("metrics"), dict):
            self.eval_metrics = {str(k): float(v) for k, v in event["metrics"].items()}
            self.eval_step = event.get("step")

    def on_exchange(self, out: Outcome) -> None:
        if out.ok:
            self.latency.observe(out.seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Collector:
    """The values read when scraped (``prometheus_client``'s custom collector protocol)."""

    def __init__(self, metrics: PeerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Any]:
        return []  # unchecked: the families depend on the peer's state (robust mixing, ...)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        peer = self.m.peer
        t, agent = peer.trainer, peer.agent

        def gauge(family: str, doc: str, value: float, **labels: str) -> Any:
            g = GaugeMetricFamily(family, doc, labels=list(labels))
            g.add_metric(list(labels.values()), value)
            return g

        def counter(family: str, doc: str, value: float) -> Any:
            return CounterMetricFamily(family, doc, value=value)

        name = agent.node.name if agent is not None else peer.cfg.name
        addr = agent.node.addr if agent is not None else peer.cfg.listen
        yield gauge("gossip_train_peer_info", "This peer (always 1)", 1, name=name, addr=addr)
        up = time.monotonic() - peer.t0
        yield gauge("gossip_train_up_seconds", "Seconds since the peer started", up)
        yield counter("gossip_train_steps", "Training steps taken", t.step)
        yield gauge("gossip_train_total_steps", "Training steps this peer will take", t.total_steps)
        yield counter("gossip_train_samples", "Training samples seen", t.samples)
        yield gauge("gossip_train_loss", "Training loss, smoothed", _finite(t.loss))
        yield from self._eval(GaugeMetricFamily)
        if agent is not None:
            yield from self._gossip(agent, CounterMetricFamily, GaugeMetricFamily)
        yield counter(
            "gossip_train_suspicions", "SWIM suspicions this peer heard", self.m.suspicions
        )
        writer = t.checkpointer
        if writer is not None and writer.last_time is not None:
            age = max(0.0, time.time() - writer.last_time)
            yield gauge(
                "gossip_train_checkpoint_age_seconds", "Seconds since the last checkpoint", age
            )

    def _eval(self, gauge_family: Any) -> Iterator[Any]:
        m = self.m
        if not m.eval_metrics:
            return
        every = gauge_family(
            "gossip_train_eval", "The last evaluation's metrics", labels=["metric"]
        )
        for key, value in m.eval_metrics.items():
            every.add_metric([key], value)
        yield every
        # The headline metric: the first the task reports (accuracy for the classifier).
        key, value = next(iter(m.eval_metrics.items()))
        head = gauge_family(
            "gossip_train_headline", "The last evaluation's first metric", labels=["metric"]
        )
        head.add_metric([key], value)
        yield head
        if m.eval_step is not None:
            yield gauge_family(
                "gossip_train_eval_step", "Step of the last evaluation", value=m.eval_step
            )

    def _gossip(self, agent: Any, counter_family: Any, gauge_family: Any) -> Iterator[Any]:
        ex = agent.exchanger
        exchanges = counter_family(
            "gossip_train_exchanges",
            "Exchanges by event: started, answered, declined (offers this peer declined), "
            "declined_by_peer, failed, completed (weights mixed, either side)",
            labels=["event"],
        )
        for event in EXCHANGE_COUNTS:
            exchanges.add_metric([event], ex.counts[event])
        exchanges.add_metric(["completed"], ex.exchanges)
        yield exchanges
        moved = counter_family(
            "gossip_train_bytes", "Bytes on the wire by kind", labels=["kind", "direction"]
        )
        for kind, way in agent.transport.stats.by_kind().items():
            moved.add_metric([kind, "sent"], way["sent"])
            moved.add_metric([kind, "received"], way["received"])
        yield moved
        counts = dict.fromkeys(STATES, 0)
        for member in agent.members():
            if member["name"] != agent.node.name:  # as the live view's alive count
                counts[member["state"]] = counts.get(member["state"], 0) + 1
        members = gauge_family(
            "gossip_train_members", "Members this peer sees, by state (itself excluded)",
            labels=["state"],
        )  # fmt: skip
        for state, n in counts.items():
            members.add_metric([state], n)
        yield members
        yield counter_family(
            "gossip_train_rejected_updates",
            "Neighbours' updates refused (not finite, implausible, screened out)",
            value=ex.rejected,
        )
        if ex.config.robust.enabled:
            screening = counter_family(
                "gossip_train_screening", "Robust mixing's verdicts", labels=["verdict"]
            )
            stats = ex.screen.stats()
            for verdict in ("accepted", "refused", "clipped", "quarantines"):
                screening.add_metric([verdict], stats[verdict])
            yield screening


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.nan


class MetricsServer:
    """``GET /metrics`` (or ``/``) on HOST:PORT, answered on the running event loop."""

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self.render = render
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise UserError(
                f"--metrics-port {self.port}: cannot listen on {self.host}:{self.port} ({why})"
            ) from None
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = self._answer(head.split(b"\r\n", 1)[0])
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away, stalled or sent garbage: nothing to answer
        finally:
            self._clients -= 1
            writer.close()

    def _answer(self, line: bytes) -> tuple[str, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST

        parts = line.split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/", b"/metrics"):
            return "404 Not Found", "text/plain", b"see /metrics\n"
        body = self.render()
        return "200 OK", CONTENT_TYPE_LATEST, b"" if parts[0] == b"HEAD" else body
