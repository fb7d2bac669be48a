"""Failure injection: the fault-injecting proxy, the fault driver, and a real chaos run (kill,
restart, partition, heal) after which every survivor is accurate."""

import asyncio
import json
import subprocess

import pytest
from conftest import ROOT, cli

import trainer.chaos.proxy as proxy
from p2p.framing import MsgType
from p2p.node import Node, NodeConfig
from p2p.secure import Keyring, new_secret
from p2p.transport import TcpTransport, TransportError
from trainer.chaos.driver import Driver
from trainer.chaos.netns import parse_rate
from trainer.chaos.proxy import Bucket, ProxyNet
from trainer.chaos.scenario import Action

# -- the proxy ---------------------------------------------------------------------------------


async def status_server(name, keyring=None):
    node = Node(TcpTransport(), name, NodeConfig(handshake_timeout=0.5, keyring=keyring))

    async def answer(conn, frame):
        await conn.send(MsgType.STATUS, {"name": name, "n": frame.header.get("n")})

    node.handlers[MsgType.STATUS_REQ] = answer
    await node.start("127.0.0.1", 0)
    return node


async def ask(conn, n, timeout=2.0):
    async with asyncio.timeout(timeout):
        await conn.send(MsgType.STATUS_REQ, {"n": n})
        reply = await conn.recv()
    return reply.header["n"]


@pytest.mark.parametrize("secret", [False, True], ids=["open", "sealed"])
async def test_the_proxy_cuts_partitions_and_heals(secret):
    # Sealed, the opening names nobody in the clear: the proxy knows callers by member tag.
    keyring = Keyring((new_secret().encode(),)) if secret else None
    servers = [await status_server(f"peer-{i}", keyring) for i in range(3)]
    proxy = ProxyNet([s.name for s in servers], [s.addr for s in servers], keyring=keyring)
    fronts = await proxy.start()
    config = NodeConfig(handshake_timeout=0.5, keyring=keyring)
    caller = Node(TcpTransport(), "peer-0", config)
    tool = Node(TcpTransport(), "gossip-train-cli", config)
    try:
        to1 = await caller.open(fronts[1])
        to2 = await caller.open(fronts[2])
        assert await ask(to1, 1) == 1 and await ask(to2, 2) == 2

        proxy.partition([[0, 2], [1]])
        with pytest.raises(TimeoutError):  # an open connection across the cut goes silent
            await ask(to1, 3, timeout=0.5)
        with pytest.raises(TransportError):  # and a new one never completes its handshake
            await caller.open(fronts[1], timeout=0.5)
        assert await ask(to2, 4) == 4  # the same side still talks
        tool_conn = await tool.open(fronts[1])  # tools (not peers) are never cut
        assert await ask(tool_conn, 5) == 5

        proxy.heal()
        assert (await to1.recv()).header["n"] == 3  # the frozen request arrives after all
        assert await ask(await caller.open(fronts[1]), 6) == 6
        for conn in (to1, to2, tool_conn):
            conn.close()
    finally:
        await caller.close()
        await tool.close()
        await proxy.close()
        for s in servers:
            await s.close()


async def test_a_capped_link_paces_bytes_at_its_rate(monkeypatch):
    clock = [100.0]
    slept = []

    async def fake_sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(proxy.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(proxy.asyncio, "sleep", fake_sleep)
    bucket = Bucket(parse_rate("8mbit"))  # 1e6 bytes/s
    for _ in range(10):
        await bucket.take(200_000)
    # 2 MB at 1 MB/s: two seconds, less the one chunk of burst that passes at once.
    assert sum(slept) == pytest.approx(2.0 - 65536 / 1e6)
    assert parse_rate("2mbps") == 2e6 and parse_rate("500kbit") == 62500
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate("10 megabits")


# -- the driver --------------------------------------------------------------------------------


class FakeNet:
    mode = "fake"

    def __init__(self):
        self.calls = []

    def partition(self, groups):
        self.calls.append(("partition", groups))

    def heal(self):
        self.calls.append(("heal",))

    def cap(self, index, rate):
        self.calls.append(("cap", index, rate))

    def uncap(self, index):
        self.calls.append(("uncap", index))

    def describe(self):
        return {"mode": self.mode}


class FakeTarget:
    def __init__(self, net=None):
        self.names = ["a", "b", "c"]
        self.net = net
        self.calls = []
        self.events = []

    def kill(self, name):
        self.calls.append(("kill", name))
        return {"pid": 1}

    def restart(self, name):
        self.calls.append(("restart", name))
        return {}

    def signal(self, name, sig):
        self.calls.append(("signal", name, int(sig)))
        return {}

    def control_addr(self, name):
        return "127.0.0.1:1"  # nothing listens: the control command fails

    def record(self, event):
        self.events.append(event)


async def test_the_driver_applies_actions_in_order_and_records_each():
    net = FakeNet()
    target = FakeTarget(net)
    actions = [
        Action(0.0, "kill", ("b",)),
        Action(0.0, "pause", ("c",)),
        Action(0.01, "partition", groups=(("a",), ("b", "c"))),
        Action(0.01, "slow-link", ("a",), rate="1mbit"),
        Action(0.02, "resume", ("c",)),
        Action(0.02, "heal"),
        Action(0.03, "slow-peer", ("a",), factor=2.0),
        Action(0.03, "restart", ("a",)),
    ]
    await Driver(actions, target).run()
    assert target.calls == [
        ("kill", "b"),
        ("signal", "c", 19),
        ("signal", "c", 18),
        ("restart", "a"),
    ]
    assert net.calls == [("partition", [[0], [1, 2]]), ("cap", 0, "1mbit"), ("heal",)]
    kinds = [(e["kind"], e["fault"]) for e in target.events]
    assert (
        kinds[-2] == ("fault_failed", "slow-peer") and "127.0.0.1:1" in target.events[-2]["error"]
    )
    assert [k for k, _ in kinds].count("fault") == 7
    assert all("elapsed" in e and "source" in e for e in target.events)


# -- a real chaos run --------------------------------------------------------------------------


@pytest.mark.real
def test_kill_restart_partition_heal_and_every_survivor_is_accurate(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["local", "--peers", "4", "--epochs", "120", "--run-dir", str(run_dir)]
    argv += ["--no-progress", "--restart-failed", "--checkpoint-seconds", "1", "--proxy"]
    # Down long enough that the others notice before it is back: a peer forked from the
    # launcher's pre-loaded parent listens again within about a second.
    argv += ["--restart-delay", "3"]
    argv += ["--chaos", str(ROOT / "examples" / "scenarios" / "smoke.toml")]
    proc = subprocess.run(
        cli(*argv),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for p in summary["peers"]:
        assert p["status"] == "finished", p
        assert p["test_accuracy"] >= 0.90, p
    assert summary["network"]["mode"] == "proxy"
    events = summary["events"]
    faults = [(e["fault"], e.get("peers"), e.get("groups")) for e in events if e["kind"] == "fault"]
    assert faults == [
        ("kill", ["peer-1"], None),
        ("restart", ["peer-2"], None),
        ("partition", None, [["peer-0", "peer-1"], ["peer-2", "peer-3"]]),
        ("heal", None, None),
    ]
    killed = {e["peer"] for e in events if e["kind"] == "exited" and e["returncode"] == -9}
    assert killed == {"peer-1", "peer-2"}
    # Both came back from their checkpoints and caught up with a live neighbour.
    resumed = {e["peer"] for e in events if e["kind"] == "resumed"}
    assert resumed == {"peer-1", "peer-2"}
    assert [p["restarts"] for p in summary["peers"]] == [0, 1, 1, 0]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["invariants_ok"], report["invariants"]
    assert report["invariants"]["checkpoints_load"]["files"] >= 4
    rows = {r["fault"]: r for r in report["faults"]}
    assert rows["kill"]["detected_s"] is not None  # the others noticed the dead peer
    assert rows["kill"]["back_s"] is not None and rows["restart"]["back_s"] is not None
    assert rows["partition"]["detected_s"] is not None
    assert rows["heal"]["whole_s"] is not None  # and membership mended after the heal
    assert (run_dir / "report.md").read_text().startswith("# Robustness report")


@pytest.mark.real
def test_the_standalone_tool_drives_a_peer_it_did_not_start(tmp_path):
    peer = subprocess.Popen(
        cli(
            "peer",
            "--listen",
            "127.0.0.1:0",
            "--epochs",
            "200",
            "--events",
            "jsonl",
            "--allow-control",
            "--run-dir",
            str(tmp_path / "p"),
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        events = []
        while not events or events[-1]["kind"] != "started":
            line = peer.stdout.readline()
            assert line, "the peer ended before it started training"
            events.append(json.loads(line))
        addr = events[0]["addr"]
        proc = subprocess.run(
            cli(
                "chaos",
                "--peer",
                f"solo={peer.pid}@{addr}",
                "--fault",
                "at=0 kind=pause peer=solo for=0.5",
                "--fault",
                "at=1 kind=slow-peer peer=solo factor=2.5 for=0.5",
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(x) for x in proc.stdout.splitlines()]
        assert lines[0]["kind"] == "chaos_plan" and lines[0]["mode"] == "process"
        assert [(e["kind"], e["fault"]) for e in lines[1:]] == [
            ("fault", "pause"),
            ("fault", "resume"),
            ("fault", "slow-peer"),
            ("fault", "unslow-peer"),
        ]
        assert lines[3]["reply"] == {"op": "slowdown", "factor": 2.5}
        peer.terminate()
        out, _ = peer.communicate(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
    slowdowns = [json.loads(x)["factor"] for x in out.splitlines() if '"slowdown"' in x]
    assert slowdowns == [2.5, 1.0]
    # Without --run-dir there is no network to cut: refused before anything happens.
    proc = subprocess.run(
        cli("chaos", "--peer", "solo=1@127.0.0.1:9", "--fault", "at=0 kind=heal"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--netns" in proc.stderr, proc.stderr
