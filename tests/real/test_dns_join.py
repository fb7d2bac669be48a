"""Peers in network namespaces join through ``--join dns:NAME:PORT``: a dnsmasq on the
namespaces' bridge serves one A record per peer for one name (as a Kubernetes headless
Service does), and every namespace's resolver asks it (/etc/netns/<ns>/resolv.conf, which
``ip netns exec`` mounts over /etc/resolv.conf).

dnsmasq comes from Debian's ``dnsmasq-base`` (the binary alone, so installing it starts no
service), installed with apt-get when missing. Skipped, with the reason, only where
namespaces cannot be created or dnsmasq cannot be had (not root, no apt-get); under CI=true
that is a failure.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, apt_install, cli

from p2p.secure import write_secret
from trainer.chaos.netns import ETC_NETNS, NamespaceNet, netns_available, owned_names

pytestmark = pytest.mark.netns

NAME = "swarm.gossip.test"
PORT = 7000
IN_CI = os.environ.get("CI") == "true"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def dnsmasq_binary() -> str:
    """dnsmasq's path, after ``apt-get install dnsmasq-base`` if it is missing."""
    found = shutil.which("dnsmasq", path=SBIN_PATH)
    if found is not None:
        return found
    if os.geteuid() != 0:
        _unavailable("not root: cannot install dnsmasq")
    if shutil.which("apt-get") is None:
        _unavailable("no apt-get: cannot install dnsmasq")
    apt_install("--no-install-recommends", "dnsmasq-base")
    found = shutil.which("dnsmasq", path=SBIN_PATH)
    if found is None:
        pytest.fail("dnsmasq-base installed, but no dnsmasq binary on the path")
    return found


@pytest.fixture(scope="module")
def dnsmasq() -> str:
    ok, why = netns_available()
    if not ok:
        _unavailable(why)
    return dnsmasq_binary()


class Dns:
    """dnsmasq answering for NAME from a hosts file alone, on the bridge's address, port 53
    (resolv.conf has no port). SIGHUP makes it read the file again."""

    def __init__(self, binary: str, net: NamespaceNet, folder: Path) -> None:
        self.hosts = folder / "dns-hosts"
        self.hosts.write_text("")
        self.proc = subprocess.Popen(
            [
                binary,
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                f"--listen-address={net.host_ip}",
                "--bind-interfaces",
                "--port=53",
                "--user=root",
                "--pid-file=",
                f"--log-facility={folder / 'dnsmasq.log'}",
                "--cache-size=0",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(net.n):
            folder_ns = ETC_NETNS / net.ns(i)
            folder_ns.mkdir(parents=True, exist_ok=True)  # removed with the namespaces
            (folder_ns / "resolv.conf").write_text(
                f"nameserver {net.host_ip}\noptions timeout:1 attempts:2\n"
            )
        time.sleep(0.3)
        if self.proc.poll() is not None:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"dnsmasq exited: {err.strip()}")

    def serve(self, ips: list[str]) -> None:
        self.hosts.write_text("".join(f"{ip} {NAME}\n" for ip in ips))
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def swarm_net(dnsmasq, tmp_path, request):
    net = NamespaceNet(request.param).create()
    dns = None
    try:
        dns = Dns(dnsmasq, net, tmp_path)
        yield net, dns
    finally:
        if dns is not None:
            dns.close()
        net.close()
    assert net.owner not in owned_names()
    assert dns is None or dns.proc.poll() is not None


def start_peer(net, i, tmp_path, n, *extra):
    key = tmp_path / "swarm.key"
    if not key.exists():
        write_secret(key)
    argv = [
        *net.exec_argv(i),
        *cli(
            "peer", "--no-slurm", "--listen", f"0.0.0.0:{PORT}",
            "--advertise", f"{net.ip(i)}:{PORT}", "--join", f"dns:{NAME}:{PORT}",
            "--secret-file", str(key), "--index", str(i), "--num-peers", str(n),
            "--wait-peers", str(n), "--join-timeout", "40",
            "--run-dir", str(tmp_path / f"peer-{i}"),
            "--epochs", "1", "--threads", "1", "--linger", "20", "--profile", "test", *extra,
        ),
    ]  # fmt: skip
    log = open(tmp_path / f"peer-{i}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log


def events(tmp_path, i):
    path = tmp_path / f"peer-{i}" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finish(procs, tmp_path, timeout):
    deadline = time.monotonic() + timeout
    try:
        for i, (proc, log) in enumerate(procs):
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
            log.close()
            assert rc == 0, (tmp_path / f"peer-{i}.log").read_text()[-3000:]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.mark.real
@pytest.mark.parametrize("swarm_net", [4], indirect=True)
def test_peers_join_through_every_record_of_a_dns_name(swarm_net, tmp_path):
    net, dns = swarm_net
    dns.serve([net.ip(i) for i in range(net.n)])
    t0 = time.monotonic()
    procs = [start_peer(net, i, tmp_path, net.n) for i in range(net.n)]
    finish(procs, tmp_path, 80)
    for i in range(net.n):
        evs = events(tmp_path, i)
        (resolved,) = [e for e in evs if e["kind"] == "resolved"]
        assert sorted(resolved["addrs"]) == sorted(f"{net.ip(j)}:{PORT}" for j in range(net.n))
        (assembled,) = [e for e in evs if e["kind"] == "assembled"]
        assert assembled["members"] == net.n, assembled
        (done,) = [e for e in evs if e["kind"] == "finished"]
        assert done["exchanges"] > 0 and done["metrics"]["accuracy"] > 0.5, done
    print(f"4 peers through dns:{NAME}:{PORT}: {time.monotonic() - t0:.1f} s")


@pytest.mark.real
@pytest.mark.parametrize("swarm_net", [2], indirect=True)
def test_peers_that_started_alone_find_each_other_when_the_name_changes(swarm_net, tmp_path):
    # Each peer first sees only its own record (two pods, each published first), so each
    # starts a swarm of its own; once the name lists both, re-resolving merges them.
    net, dns = swarm_net
    procs = []
    for i in range(net.n):
        dns.serve([net.ip(i)])
        procs.append(start_peer(net, i, tmp_path, net.n))
        deadline = time.monotonic() + 30
        while not (tmp_path / f"peer-{i}" / "events.jsonl").exists() or not [
            e for e in events(tmp_path, i) if e["kind"] == "resolved"
        ]:
            assert time.monotonic() < deadline, "peer did not resolve"
            time.sleep(0.2)
    dns.serve([net.ip(i) for i in range(net.n)])
    finish(procs, tmp_path, 80)
    for i in range(net.n):
        evs = events(tmp_path, i)
        (resolved,) = [e for e in evs if e["kind"] == "resolved"]
        assert resolved["addrs"] == [f"{net.ip(i)}:{PORT}"]  # alone at first
        (assembled,) = [e for e in evs if e["kind"] == "assembled"]
        assert assembled["members"] == net.n, assembled
        (done,) = [e for e in evs if e["kind"] == "finished"]
        assert done["exchanges"] > 0, done
