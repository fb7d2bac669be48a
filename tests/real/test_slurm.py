"""A real one-node Slurm cluster (Debian's slurm-wlm and munge) runs the shipped batch
script: 4 tasks train one model, one task is SIGKILLed mid-run, the other three finish.
A second cluster has a slurmd in each of two network namespaces, nodes with names and
addresses of their own: a job of 4 tasks on both trains across them.

The set-up installs the packages when they are missing (apt-get), makes a munge key,
writes a slurm.conf for this machine (its real hostname and CPU count, every file under
a temporary folder, its own ports), starts munged, slurmctld and slurmd, and waits for
``sinfo`` to show the node idle. The tear-down cancels what is left of the job and stops
every daemon it started, by pid, then removes the folder. Skipped only outside CI when not
root or without apt-get; under CI=true a failed install or start is a failure.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, apt_install

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun", "scontrol")
IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(where: list[str]) -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in where if shutil.which(t, path=path) is None]


def install() -> None:
    """apt-get install slurm-wlm munge, when a daemon or client is missing."""
    if not missing([*DAEMONS, *CLIENTS]):
        return
    reason = None
    if os.geteuid() != 0:
        reason = "not root: cannot install slurm-wlm and munge"
    elif shutil.which("apt-get") is None:
        reason = "no apt-get: cannot install slurm-wlm and munge"
    if reason is not None and IN_CI:
        pytest.fail(f"CI=true: {reason}")
    if reason is not None:
        pytest.skip(reason)
    apt_install("slurm-wlm", "munge")
    if missing([*DAEMONS, *CLIENTS]):
        pytest.fail(f"installed, but {', '.join(missing([*DAEMONS, *CLIENTS]))} still missing")


class Cluster:
    """munged + slurmctld + slurmd for this one machine, everything under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def write_config(self) -> None:
        r = self.root
        for sub in ("ctld", "spool", "job"):
            (r / sub).mkdir()
        key = r / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            f"""ClusterName=gt{os.getpid()}
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / "munge.sock"}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / "ctld"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""
        )

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - closed at once, the child keeps it
        try:
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def start(self) -> None:
        r = self.root
        self._start(
            "munged",
            [
                "munged", "--foreground", "--force", f"--socket={r / 'munge.sock'}",
                f"--key-file={r / 'munge.key'}", f"--pid-file={r / 'munged.pid'}",
                f"--log-file={r / 'munged.log'}", f"--seed-file={r / 'munged.seed'}",
            ],
        )  # fmt: skip
        self._wait(lambda: (r / "munge.sock").exists(), 10, "munged's socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.start_nodes()

    def start_nodes(self) -> None:
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(lambda: self.sinfo() in ("idle", "idle*"), 40, "the node idle in sinfo")

    def sinfo(self) -> str:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = {n: self.log(n) for n in self.procs}
                why = f"{', '.join(dead)} exited" if dead else f"no {what} within {timeout:.0f} s"
                raise RuntimeError(f"slurm set-up: {why}; logs: {json.dumps(logs)[:3000]}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        text = ""
        for path in (self.root / f"{name}.out", self.root / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-1500:]
        return text

    def stop(self) -> None:
        """Cancel every job, then stop the slurmds, slurmctld and munged (in that order)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._queue():
                time.sleep(0.3)
        slurmds = [n for n in self.procs if n.startswith("slurmd")]  # one, or one a node
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _queue(self) -> str:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()


def job_pids(job_id: str) -> dict[int, int]:
    """SLURM_PROCID -> pid of every `peer` process of the job (read from /proc)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(
                kv.split(b"=", 1)
                for kv in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
        except OSError:
            continue
        # The peer's own interpreter, not the srun (or shell) whose command line names it.
        if cmd[0] != sys.executable.encode() or b"trainer.cli" not in cmd or b"peer" not in cmd:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode():
            found[int(env[b"SLURM_PROCID"])] = int(entry.name)
    return found


@pytest.fixture(scope="module")
def cluster():
    install()
    if os.geteuid() != 0 and IN_CI:
        pytest.fail("CI=true: not root; slurmd runs as root")
    if os.geteuid() != 0:
        pytest.skip("not root: slurmd runs as root")
    root = Path(tempfile.mkdtemp(prefix="gt-slurm-"))
    c = Cluster(root)
    try:
        c.write_config()
        c.start()
        yield c
    finally:
        c.stop()
        pids = [p.pid for p in c.procs.values()]
        shutil.rmtree(root, ignore_errors=True)
    for pid in pids:  # nothing left running
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def progress(job_dir: Path, index: int) -> tuple[int, int]:
    """(step, total steps) of a task's newest progress event; (0, 1) before the first."""
    path = job_dir / f"peer-{index}" / "events.jsonl"
    last = (0, 1)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("kind") == "progress":
                last = (int(e.get("step") or 0), int(e.get("total") or 1))
    return last


@pytest.mark.real
def test_four_tasks_train_and_three_finish_after_one_is_killed(cluster):
    t0 = time.monotonic()
    workdir = cluster.root / "job"
    env = {
        **cluster.env,
        "GOSSIP_TRAIN": f"{sys.executable} -m trainer.cli",
        "PYTHONPATH": str(ROOT),
    }
    # The node has fewer CPUs than tasks: --overcommit lets 4 tasks share them.
    sbatch = subprocess.Popen(
        [
            "sbatch", "--wait", "--parsable", "--overcommit", "--ntasks=4", "--time=5",
            str(ROOT / "deploy/slurm/train.sbatch"),
            "--epochs", "30", "--threads", "1", "--profile", "test", "--linger", "20",
        ],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sbatch.stdout is not None
        job_id = sbatch.stdout.readline().strip().split(";")[0]
        assert job_id.isdigit(), sbatch.stderr.read() if sbatch.stderr else ""
        job_dir = workdir / f"gossip-train-{job_id}"
        deadline = time.monotonic() + 60
        # Kill task 1 a fifth of the way through its steps: the others have met it by then.
        while len(job_pids(job_id)) < 4 or 5 * progress(job_dir, 1)[0] < progress(job_dir, 1)[1]:
            if time.monotonic() > deadline or sbatch.poll() is not None:
                out = (workdir / f"gossip-train-{job_id}.out").read_text()[-3000:]
                pytest.fail(f"the job's tasks did not all start training: {out}")
            time.sleep(0.2)
        killed_at = progress(job_dir, 1)[0]
        os.kill(job_pids(job_id)[1], signal.SIGKILL)  # exactly one task
        rc = sbatch.wait(80)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
            sbatch.wait()
        for pipe in (sbatch.stdout, sbatch.stderr):
            if pipe is not None:
                pipe.close()
    out = (workdir / f"gossip-train-{job_id}.out").read_text()
    assert rc != 0, out[-2000:]  # the step reports its killed task
    summary = json.loads((job_dir / "summary.json").read_text())
    by_dir = {p["addr"]: p for p in summary["peers"]}
    assert len(by_dir) == 4, summary["peers"]
    status = {p["name"]: p["status"] for p in summary["peers"]}
    finished = [p for p in summary["peers"] if p["status"] == "finished"]
    assert len(finished) == 3, status
    for p in finished:
        assert p["exchanges"] > 0 and p["metrics"]["accuracy"] > 0.5, p
    (lost,) = [p for p in summary["peers"] if p["status"] != "finished"]
    assert lost["addr"].endswith(":7401") and (lost["steps"] or 0) >= killed_at, lost
    # Every task's settings came from Slurm: index, size, address, seeds, folder.
    for i in range(4):
        cfg = json.loads((job_dir / f"peer-{i}" / "config.json").read_text())
        assert (cfg["index"], cfg["num_peers"], cfg["wait_peers"]) == (i, 4, 4)
        assert cfg["advertise"] == f"{cluster.host}:{7400 + i}"
        assert cfg["checkpoint"]["directory"] == str(job_dir / f"peer-{i}" / "checkpoints")
        assert cfg["secret_file"] == str(job_dir / "swarm.key")
    assert not job_pids(job_id)
    print(f"slurm job {job_id}: {time.monotonic() - t0:.1f} s, {status}")


class TwoHosts(Cluster):
    """slurmctld on this machine, at the address of the namespaces' bridge, and one slurmd in
    each of two network namespaces: two nodes with their own names (the namespaces', which
    every namespace's /etc/hosts lists) and addresses, so the node list names two hosts."""

    def __init__(self, root: Path, net) -> None:
        super().__init__(root)
        self.net = net
        self.nodes = [net.ns(i) for i in range(2)]

    def write_config(self) -> None:
        super().write_config()
        r = self.root
        per_node = ("SlurmctldHost=", "NodeName=", "PartitionName=", "SlurmdSpoolDir=")
        per_node += ("SlurmdPidFile=", "SlurmdLogFile=")
        lines = [ln for ln in self.conf.read_text().splitlines() if not ln.startswith(per_node)]
        lines += [
            f"SlurmctldHost={self.host}({self.net.host_ip})",
            f"SlurmdSpoolDir={r / 'spool'}/%n",  # %n: the node's name, one folder each
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            *(
                f"NodeName={n} NodeAddr={self.net.ip(i)} CPUs=2 State=UNKNOWN"
                for i, n in enumerate(self.nodes)
            ),
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=FORCE",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        for n in self.nodes:
            (r / "spool" / n).mkdir()

    def start_nodes(self) -> None:
        for n in self.nodes:  # munge's socket is a file: every namespace sees it
            # Not `ip netns exec`: it mounts a /sys of the namespace's own, without the cgroup
            # file systems slurmd needs. Only the network namespace is entered, and in a
            # private mount namespace the node's /etc/hosts (naming every node) is bound over
            # the host's, as `ip netns exec` would.
            hosts = f"/etc/netns/{n}/hosts"
            run = f"mount --bind {hosts} /etc/hosts && exec slurmd -D -f {self.conf} -N {n}"
            argv = ["nsenter", f"--net=/var/run/netns/{n}", "unshare", "--mount"]
            self._start(f"slurmd-{n}", [*argv, "--propagation", "private", "sh", "-c", run])
        self._wait(lambda: self.node_states() == ["idle", "idle"], 40, "both nodes idle")

    def node_states(self) -> list[str]:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
        return out.stdout.split()


@pytest.mark.real
def test_a_job_on_two_namespace_hosts_trains_across_both(tmp_path):
    from trainer.chaos.netns import NamespaceNet, netns_available

    install()
    if os.geteuid() != 0 or not netns_available():
        if IN_CI:
            pytest.fail("CI=true: network namespaces are not available (root and ip netns)")
        pytest.skip("needs root and network namespaces")
    net = NamespaceNet(2).create()
    root = Path(tempfile.mkdtemp(prefix="gt-slurm2-"))
    c = TwoHosts(root, net)
    try:
        c.write_config()
        c.start()
        workdir = root / "job"
        env = {**c.env, "GOSSIP_TRAIN": f"{sys.executable} -m trainer.cli", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [
                "sbatch", "--wait", "--parsable", "--overcommit", "--nodes=2", "--ntasks=4",
                "--time=5", str(ROOT / "deploy/slurm/train.sbatch"),
                "--epochs", "1", "--threads", "1", "--profile", "test", "--linger", "20",
            ],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        job_id = proc.stdout.strip().split(";")[0]
        out = (workdir / f"gossip-train-{job_id}.out").read_text() if job_id.isdigit() else ""
        assert proc.returncode == 0, (proc.stderr + out)[-3000:]
        summary = json.loads((workdir / f"gossip-train-{job_id}" / "summary.json").read_text())
        peers = summary["peers"]
        assert [p["status"] for p in peers] == ["finished"] * 4, peers
        assert all(p["exchanges"] > 0 for p in peers), peers
        # Two tasks on each node, at its own name and address: the node list named both.
        addrs = sorted(p["addr"] for p in peers)
        assert addrs == sorted(f"{n}:{port}" for n in c.nodes for port in (7400, 7401)), addrs
    finally:
        c.stop()
        pids = [p.pid for p in c.procs.values()]
        net.close()
        shutil.rmtree(root, ignore_errors=True)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
