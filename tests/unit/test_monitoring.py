"""Live metrics (trainer.metrics) and TensorBoard scalars (trainer.board) of one peer, on
stand-ins for the peer: what a scrape says, the server's bounds, the event files' scalars."""

import asyncio
import socket
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gossip.exchange import EXCHANGE_COUNTS, Outcome
from p2p.transport import Stats
from trainer.board import Board, run_name
from trainer.launch.local import check_metrics_ports
from trainer.metrics import MetricsServer, PeerMetrics, check_port
from trainer.runtime import UserError


def fake_peer(robust=False):
    counts = dict.fromkeys(EXCHANGE_COUNTS, 0)
    screen = SimpleNamespace(
        stats=lambda: {"accepted": 3, "refused": 1, "clipped": 0, "quarantines": 0}
    )
    exchanger = SimpleNamespace(
        counts=counts,
        exchanges=0,
        rejected=0,
        screen=screen,
        config=SimpleNamespace(robust=SimpleNamespace(enabled=robust)),
    )
    members = [
        {"name": "b", "state": "alive"},
        {"name": "c", "state": "suspect"},
        {"name": "d", "state": "dead"},
    ]
    agent = SimpleNamespace(
        node=SimpleNamespace(name="a", addr="127.0.0.1:1"),
        exchanger=exchanger,
        transport=SimpleNamespace(stats=Stats()),
        members=lambda: members,
    )
    writer = SimpleNamespace(last_time=time.time() - 5)
    trainer = SimpleNamespace(
        step=0, total_steps=100, samples=0, loss=float("nan"), checkpointer=writer
    )
    return SimpleNamespace(trainer=trainer, agent=agent, cfg=None, t0=time.monotonic())


def scrape(m: PeerMetrics) -> dict[str, float]:
    """Every sample of a scrape, by name and labels: {"name{k=v}": value}."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_a_scrape_holds_every_metric_and_follows_the_peer():
    peer = fake_peer(robust=True)
    m = PeerMetrics(peer)
    first = scrape(m)
    assert first["gossip_train_steps_total"] == 0
    assert first["gossip_train_members{state=suspect}"] == 1
    assert first["gossip_train_members{state=left}"] == 0
    assert first["gossip_train_screening_total{verdict=refused}"] == 1
    assert 4 <= first["gossip_train_checkpoint_age_seconds"] < 60
    assert "gossip_train_headline{metric=accuracy}" not in first  # no evaluation yet

    peer.trainer.step, peer.trainer.samples, peer.trainer.loss = 10, 320, 0.5
    ex = peer.agent.exchanger
    ex.counts["started"], ex.exchanges, ex.rejected = 3, 2, 1
    peer.agent.transport.stats.sent_by_kind[0] = 4096
    m.on_exchange(Outcome(True, "b", seconds=0.02))
    m.on_exchange(Outcome(False, "b", "busy", busy=True))  # not a latency
    m.on_event({"kind": "suspect", "subject": "c"})
    m.on_event({"kind": "eval", "step": 10, "metrics": {"accuracy": 0.75, "loss": 0.6}})
    now = scrape(m)
    assert now["gossip_train_steps_total"] == 10
    assert now["gossip_train_samples_total"] == 320
    assert now["gossip_train_loss"] == 0.5
    assert now["gossip_train_exchanges_total{event=started}"] == 3
    assert now["gossip_train_exchanges_total{event=completed}"] == 2
    assert now["gossip_train_rejected_updates_total"] == 1
    assert now["gossip_train_bytes_total{direction=sent,kind=weights}"] == 4096
    assert now["gossip_train_exchange_seconds_count"] == 1
    assert now["gossip_train_suspicions_total"] == 1
    assert now["gossip_train_headline{metric=accuracy}"] == 0.75
    assert now["gossip_train_eval{metric=loss}"] == 0.6
    assert now["gossip_train_eval_step"] == 10


def test_each_peer_has_its_own_registry():
    a, b = PeerMetrics(fake_peer()), PeerMetrics(fake_peer())  # no duplicate-name error
    a.peer.trainer.step = 5
    assert scrape(a)["gossip_train_steps_total"] == 5
    assert scrape(b)["gossip_train_steps_total"] == 0


async def http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_server_answers_metrics_and_nothing_else():
    m = PeerMetrics(fake_peer())
    server = MetricsServer(m.render, "127.0.0.1", free_port())
    await server.start()
    try:
        ok = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = ok.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "gossip_train_steps" in names
        assert (await http(server.port, b"GET /other HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await http(server.port, b"POST / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        # A head longer than the bound is dropped unanswered, and the server goes on.
        assert await http(server.port, b"GET /" + b"x" * 20000 + b"\r\n\r\n") == b""
        assert (await http(server.port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = MetricsServer(lambda: b"", "127.0.0.1", port)
        with pytest.raises(UserError, match=f"--metrics-port {port}: cannot listen"):
            await server.start()
        with pytest.raises(UserError, match=f"port {port} of 127.0.0.1"):
            check_metrics_ports(port - 1, 2)


def test_ports_out_of_range():
    for port in (0, -1, 65536):
        with pytest.raises(UserError, match="1..65535"):
            check_port(port)
    with pytest.raises(UserError, match="--metrics 65535: 2 peers need ports 65535..65536"):
        check_metrics_ports(65535, 2)  # the second peer's port would be 65536


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = Board(tmp_path)
    progress = {"kind": "progress", "peer": "127.0.0.1:7000", "ts": 1.0, "step": 5}
    board({**progress, "loss": 0.9, "exchanges": 1, "bytes_sent": 100, "alive": 1})
    board({**progress, "step": 10, "loss": 0.5, "exchanges": 3, "disagreement": 0.25,
           "bytes": {"weights": {"sent": 64, "received": 32}}})  # fmt: skip
    board({"kind": "eval", "peer": "x", "step": 10, "metrics": {"accuracy": 0.8}})
    board({"kind": "finished", "peer": "x", "steps": 12, "metrics": {"accuracy": 0.85}})
    board({"kind": "suspect", "peer": "x"})  # not a scalar
    board.close()
    run = tmp_path / run_name("127.0.0.1:7000")
    assert run.name == "127.0.0.1_7000"
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/exchanges", "train/disagreement", "bytes/weights_sent"} <= tags
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(5, 0.9), (10, 0.5)]
    assert acc.Scalars("eval/headline")[0].value == pytest.approx(0.8)
    assert acc.Scalars("final/accuracy")[0].step == 12


def test_examples_name_metrics_that_exist():
    """The Grafana dashboard's queries use metrics a scrape has; the Prometheus config
    scrapes the ports `local --peers 4 --metrics` uses."""
    import json
    import re
    from pathlib import Path

    from trainer.flags import DEFAULT_METRICS_PORT

    root = Path(__file__).resolve().parents[2] / "examples"
    dash = json.loads((root / "grafana-dashboard.json").read_text())
    peer = fake_peer(robust=True)
    m = PeerMetrics(peer)
    m.on_event({"kind": "eval", "step": 1, "metrics": {"accuracy": 0.5}})
    m.on_exchange(Outcome(True, "b", seconds=0.1))
    have = set(scrape(m).keys())
    names = {k.split("{")[0] for k in have}
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"] and panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"gossip_train_[a-z_]+", target["expr"]))
    assert used and used <= names, used - names
    config = (root / "prometheus.yml").read_text()
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", config)]
    assert ports == [DEFAULT_METRICS_PORT + i for i in range(4)]
