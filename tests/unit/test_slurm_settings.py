"""Slurm's host lists, tasks per node and the peer settings srun's variables give a task;
StatefulSet ordinals (``--index auto``); ``dns:`` seeds. Bad input: one line, exit 2."""

import argparse
import asyncio
import json
import os
import shutil
import subprocess

import pytest
from conftest import ROOT

from p2p import dns
from trainer import cli
from trainer.flags import SLURM_OFF_ENV, peer_config, slurm_wanted
from trainer.launch import k8s, slurm

# `scontrol show hostnames EXPR` of slurm-wlm 22.05 (Debian 12), one name a line, as literal
# data so the test runs where Slurm is not installed.
SCONTROL = {
    "n[01-03,7]": ["n01", "n02", "n03", "n7"],
    "a,b[1-2]": ["a", "b1", "b2"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "x": ["x"],
    "n[1-2],m[3]": ["n1", "n2", "m3"],
    "n[09-10]": ["n09", "n10"],
    "n[1-3]-[5-6]": ["n1-5", "n1-6", "n2-5", "n2-6", "n3-5", "n3-6"],
    "n[001-3]": ["n001", "n002", "n003"],
    "n[1-003]": ["n1", "n2", "n3"],
    "a,,b": ["a", "b"],
    "n[1-2,2]": ["n1", "n2", "n2"],
    "b,a,b": ["b", "a", "b"],
    "n[7-7]": ["n7"],
    "n[0-1]": ["n0", "n1"],
    "a b": ["a", "b"],
}
# What scontrol calls an invalid host list (or, for the unbalanced brackets, expands to
# garbage such as `n]`): an error here.
BAD = ["a[1-3]b", "n[3-1]", "n[a-b]", "n[]", "n[1,,2]", "n[1-", "n[1-2", "n1]", "n[[1]]"]


@pytest.fixture(autouse=True)
def no_outer_slurm(monkeypatch):
    """Tests run inside a Slurm job see none of its variables."""
    for key in list(os.environ):
        if key.startswith("SLURM"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("expr", sorted(SCONTROL))
def test_hostlist_expands_as_scontrol_does(expr):
    assert slurm.expand_hostlist(expr) == SCONTROL[expr]


@pytest.mark.parametrize("expr", BAD)
def test_a_malformed_hostlist_is_a_one_line_error(expr):
    with pytest.raises(slurm.SlurmError, match="bad host list") as info:
        slurm.expand_hostlist(expr)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("expr", ["", "  ", ","])
def test_an_empty_hostlist_is_an_error(expr):
    with pytest.raises(slurm.SlurmError, match="empty host list"):
        slurm.expand_hostlist(expr)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_hostlist_matches_live_scontrol(tmp_path):
    # `scontrol show hostnames` needs a configuration to read, not a running cluster.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=h\nNodeName=h CPUs=1\nPartitionName=p Nodes=h\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for expr, want in SCONTROL.items():
        out = subprocess.run(
            ["scontrol", "show", "hostnames", expr], env=env, capture_output=True, text=True
        )
        assert out.stdout.split() == want == slurm.expand_hostlist(expr), expr


@pytest.mark.parametrize(
    "text, counts",
    [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2(x2)", [1, 2, 2]), ("3(x1)", [3])],
)
def test_tasks_per_node(text, counts):
    assert slurm.parse_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "2x3", "2(x)", "a", "2(x3", "1,,2"])
def test_bad_tasks_per_node(text):
    with pytest.raises(slurm.SlurmError, match="bad tasks per node"):
        slurm.parse_tasks_per_node(text)


def job_env(**over):
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "7",
        "SLURM_JOB_NODELIST": "n[01-03,7]",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_LOCALID": "1",
        "SLURMD_NODENAME": "n02",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": "/home/u",
    }
    return {k: v for k, v in {**env, **over}.items() if v is not None}


def test_settings_from_srun_variables():
    s = slurm.settings(job_env(), 7400)
    assert (s.index, s.num_peers) == (3, 7)
    assert (s.listen, s.advertise) == ("0.0.0.0:7401", "n02:7401")
    assert s.join == (
        "n01:7400", "n01:7401", "n02:7400", "n02:7401", "n03:7400", "n03:7401", "n7:7400",
    )  # fmt: skip
    assert s.run_dir == "/home/u/gossip-train-42/peer-3"
    assert s.checkpoint_dir == "/home/u/gossip-train-42/peer-3/checkpoints"


def test_a_steps_own_variables_win_over_the_jobs():
    env = job_env(
        SLURM_STEP_NODELIST="n[02-03]", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NUM_TASKS="2",
        SLURM_PROCID="1", SLURM_LOCALID="0", SLURMD_NODENAME="n03",
    )  # fmt: skip
    s = slurm.settings(env, 9000)
    assert (s.index, s.num_peers, s.advertise) == (1, 2, "n03:9000")
    assert s.join == ("n02:9000", "n03:9000")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"SLURM_JOB_NODELIST": "n[1-"}, "bad host list"),
        ({"SLURM_TASKS_PER_NODE": "2(x2)"}, "lists 2 nodes"),
        ({"SLURM_PROCID": "7"}, "not below SLURM_NTASKS"),
        ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS"),
        ({"SLURM_JOB_NODELIST": None}, "not inside a Slurm task"),
    ],
)
def test_bad_slurm_variables(over, match):
    with pytest.raises(slurm.SlurmError, match=match):
        slurm.settings(job_env(**over), 7400)


def test_detection_and_its_switches():
    assert slurm_wanted(None, job_env())
    assert not slurm_wanted(False, job_env())
    assert not slurm_wanted(None, {**job_env(), SLURM_OFF_ENV: "0"})
    assert not slurm_wanted(None, job_env(SLURM_PROCID=None))
    assert slurm_wanted(True, {})


def peer_args(*argv):
    args = cli.build_parser().parse_args(["peer", *argv])
    assert isinstance(args, argparse.Namespace)
    return args


def test_peer_config_under_slurm(monkeypatch):
    for k, v in job_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(SLURM_OFF_ENV, raising=False)
    cfg = peer_config(peer_args("--slurm-port-base", "8000", "--run-dir", "/tmp/mine"))
    assert (cfg.index, cfg.num_peers, cfg.wait_peers) == (3, 7, 7)
    assert cfg.advertise == "n02:8001" and cfg.join[0] == "n01:8000"
    assert cfg.run_dir == "/tmp/mine"  # a flag still wins
    assert cfg.checkpoint.directory == "/home/u/gossip-train-42/peer-3/checkpoints"
    off = peer_config(peer_args("--no-slurm"))
    assert (off.index, off.join, off.checkpoint.directory) == (0, (), None)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"SLURM_JOB_NODELIST": ""}, "not inside a Slurm task"),
        ({"SLURM_JOB_NODELIST": ","}, "empty host list"),
        ({"SLURM_JOB_NODELIST": "n[3-1]"}, "runs backwards"),
    ],
)
def test_bad_slurm_input_exits_2_with_one_line(monkeypatch, capsys, over, needle):
    for k, v in job_env(**over).items():
        monkeypatch.setenv(k, v)
    assert cli.main(["peer", "--slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gossip-train: error:" in err[0] and needle in err[0], err


@pytest.mark.parametrize(
    "host, n, index", [("trainer-0", 4, 0), ("trainer-3", 4, 3), ("my-set-12.svc.local", 20, 12)]
)
def test_statefulset_ordinal(host, n, index):
    assert k8s.ordinal(host, n) == index


@pytest.mark.parametrize(
    "host, n, match",
    [("trainer", 4, "no StatefulSet ordinal"), ("trainer-x", 4, "no StatefulSet ordinal"),
     ("-3", 4, "no StatefulSet ordinal"), ("trainer-4", 4, "not below --num-peers 4")],
)  # fmt: skip
def test_bad_ordinal(host, n, match):
    with pytest.raises(k8s.OrdinalError, match=match):
        k8s.ordinal(host, n)


def test_index_auto_out_of_range_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(k8s.socket, "gethostname", lambda: "trainer-5")
    assert cli.main(["peer", "--no-slurm", "--index", "auto", "--num-peers", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ordinal 5" in err[0] and "--num-peers 4" in err[0], err


def test_index_auto_from_hostname(monkeypatch):
    monkeypatch.setattr(k8s.socket, "gethostname", lambda: "trainer-2")
    cfg = peer_config(peer_args("--no-slurm", "--index", "auto", "--num-peers", "4"))
    assert cfg.index == 2


@pytest.mark.parametrize("seed", ["dns:svc", "dns::7000", "dns:svc:0", "dns:svc:x"])
def test_bad_dns_seed(seed):
    with pytest.raises(ValueError, match="expected dns:NAME:PORT"):
        dns.parse(seed)


def test_dns_seed_resolves_to_every_address():
    found = asyncio.run(dns.expand(["dns:localhost:7000", "10.0.0.1:7000"]))
    assert "10.0.0.1:7000" in found and "127.0.0.1:7000" in found


def test_a_name_that_does_not_resolve_is_one_line():
    with pytest.raises(dns.DnsError, match="does not resolve|no answer") as info:
        asyncio.run(dns.expand(["dns:no-such-host.invalid:7000"], timeout=3))
    assert "\n" not in str(info.value) and "dns:no-such-host.invalid:7000" in str(info.value)


def test_sbatch_script_is_shipped():
    text = (ROOT / "deploy/slurm/train.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "--slurm" in text and "--secret-file" in text


def test_summary_of_a_job_folder_without_run_json(tmp_path):
    from trainer.launch import summary

    for i in range(2):
        folder = tmp_path / f"peer-{i}"
        folder.mkdir()
        lines = [
            {"ts": 10.0 + i, "peer": f"n{i}:7400", "kind": "listening", "addr": f"n{i}:7400"},
            {"ts": 12.0 + i, "peer": f"n{i}:7400", "kind": "finished", "steps": 5},
        ]
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (tmp_path / "peer-x").mkdir()  # not a peer's folder
    built = summary.build(tmp_path, consensus=False)
    assert [(p["name"], p["status"], p["steps"]) for p in built["peers"]] == [
        ("n0:7400", "finished", 5),
        ("n1:7400", "finished", 5),
    ]
    assert built["events"][0]["t"] == 0.0


def test_summary_of_an_empty_folder_is_one_line(tmp_path):
    from trainer.launch import summary

    with pytest.raises(summary.SummaryError, match="not a run folder"):
        summary.build(tmp_path, consensus=False)


def test_gossip_optimizer_settings_under_srun(monkeypatch):
    from trainer.own_loop import own_loop_config

    for k, v in job_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GOSSIP_TRAIN_SLURM_PORT_BASE", "9100")
    for key in ("GOSSIP_TRAIN_CONFIG", SLURM_OFF_ENV, "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cfg = own_loop_config({"secret_file": "/k"})
    assert (cfg.index, cfg.num_peers, cfg.advertise) == (3, 7, "n02:9101")
    assert cfg.run_dir == "/home/u/gossip-train-42/peer-3" and cfg.secret_file == "/k"
    monkeypatch.setenv(SLURM_OFF_ENV, "0")
    assert own_loop_config({}).index == 0
