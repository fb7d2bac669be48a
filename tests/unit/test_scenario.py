"""Configuration files: fault scenarios (TOML and flags, seeded random chaos) and peer TOML."""

from unittest.mock import ANY

import pytest
from conftest import ROOT

from trainer.chaos.driver import parse_peer_flag
from trainer.chaos.scenario import (
    ScenarioError,
    load_scenario,
    plan,
    scenario_from_flags,
)
from trainer.cli import build_parser
from trainer.config import ConfigError, load_toml
from trainer.flags import peer_config

NAMES = [f"peer-{i}" for i in range(4)]


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text):
    with pytest.raises(ScenarioError) as info:
        plan(load_scenario(write(tmp_path, text)), NAMES)
    return str(info.value)


# -- scenarios -----------------------------------------------------------------------------------


def test_a_scenario_file_becomes_timed_actions(tmp_path):
    path = write(
        tmp_path,
        """
[[fault]]
at = 10
kind = "partition"
groups = [[0, 1], ["peer-2"]]
duration = 30

[[fault]]
at = 2.5
kind = "kill"
peer = "peer-3"

[[fault]]
at = 5
kind = "slow-link"
peer = 1
rate = "10mbit"
duration = 2
""",
    )
    actions = plan(load_scenario(path), NAMES)
    got = [(a.at, a.kind, a.peers, a.groups, a.rate) for a in actions]
    assert got == [
        (2.5, "kill", ("peer-3",), (), None),
        (5.0, "slow-link", ("peer-1",), (), "10mbit"),
        (7.0, "unslow-link", ("peer-1",), (), None),
        # peer-3 is in no group: the unlisted peers form a group of their own.
        (10.0, "partition", (), (("peer-0", "peer-1"), ("peer-2",), ("peer-3",)), None),
        (40.0, "heal", (), (), None),
    ]
    assert actions[0].source == f"{path}:8"


def test_repeated_flags_say_the_same_as_a_file():
    scenario = scenario_from_flags(
        ["at=10 kind=partition groups=0,1/2,3 for=30", "at=1 kind=pause peer=peer-2 duration=4"],
        ["kind=slow-peer every=5 until=12 factor=3 duration=1"],
        seed=3,
    )
    actions = plan(scenario, NAMES)
    kinds = [(a.kind, a.peers, a.groups) for a in actions if a.kind in ("pause", "partition")]
    assert kinds == [
        ("pause", ("peer-2",), ()),
        ("partition", (), (("peer-0", "peer-1"), ("peer-2", "peer-3"))),
    ]
    slow = [a for a in actions if a.kind == "slow-peer"]
    assert [a.factor for a in slow] == [3.0, 3.0] and [a.at for a in slow] == [5.0, 10.0]


def test_seeded_random_chaos_replays_exactly_from_its_seed():
    scenario = scenario_from_flags([], ["kind=kill every=20 jitter=5 until=180"])
    first = plan(scenario, NAMES, seed=11)
    assert [a.to_json() for a in plan(scenario, NAMES, seed=11)] == [a.to_json() for a in first]
    other = plan(scenario, NAMES, seed=12)
    assert [(a.at, a.peers) for a in other] != [(a.at, a.peers) for a in first]
    times = [a.at for a in first]
    assert 15 <= times[0] <= 25 and times[-1] <= 180
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps and all(10 <= g <= 30 for g in gaps)  # each time is every +- jitter
    assert {a.peers[0] for a in first} <= set(NAMES) and len({a.peers for a in first}) > 1


def test_the_seed_in_the_file_is_used_unless_overridden(tmp_path):
    text = "seed = 5\n[[random]]\nkind = 'restart'\nevery = 3\ncount = 6\n"
    scenario = load_scenario(write(tmp_path, text))
    assert [a.to_json() for a in plan(scenario, NAMES)] == [
        a.to_json() for a in plan(scenario, NAMES, seed=5)
    ]
    assert len(plan(scenario, NAMES)) == 6


def test_random_partitions_split_in_halves():
    scenario = scenario_from_flags([], ["kind=partition every=10 count=3 duration=2"])
    for a in plan(scenario, NAMES, seed=1):
        if a.kind == "partition":
            assert sorted(len(g) for g in a.groups) == [2, 2]
            assert sorted(p for g in a.groups for p in g) == NAMES
    # Peers that are not candidates stay together, apart from both halves.
    some = scenario_from_flags([], ["kind=partition every=10 count=1 duration=2 peers=[0,1]"])
    groups = plan(some, NAMES)[0].groups
    assert sorted(groups) == [("peer-0",), ("peer-1",), ("peer-2", "peer-3")]
    one = scenario_from_flags([], ["kind=partition every=10 count=1 duration=2 peers=[3]"])
    with pytest.raises(ScenarioError, match="two or more"):
        plan(one, NAMES)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("[[fault]]\nat = 1\nkind = 'explode'\npeer = 0\n", 3, "unknown fault kind 'explode'"),
        ("[[fault]]\nat = 1\nkind = 'kill'\npeer = 0\nspeed = 3\n", 5, "unknown key 'speed'"),
        ("\n[[fault]]\nkind = 'kill'\npeer = 0\n", 2, "needs 'at'"),
        ("[[fault]]\nat = -1\nkind = 'kill'\npeer = 0\n", 2, "at must be at least 0"),
        ("[[fault]]\nat = 1\nkind = 'kill'\n", 1, "needs 'peer'"),
        ("[[fault]]\nat = 1\nkind = 'slow-link'\npeer = 0\nrate = 'fast'\n", 5, "bad rate"),
        ("[[fault]]\nat = 1\nkind = 'slow-peer'\npeer = 0\nfactor = 0.5\n", 5, "factor"),
        (
            "[[fault]]\nat = 1\nkind = 'kill'\npeer = 0\n\n[[fault]]\nat = 'x'\nkind = 'heal'\n",
            7,
            "number",
        ),
        ("[[fault]]\nat = 1\n", 1, "needs 'kind'"),
        ("[[random]]\nkind = 'kill'\nevery = 5\n", 1, "'until' or 'count'"),
        ("[[random]]\nkind = 'kill'\nevery = 5\njitter = 9\ncount = 2\n", 4, "jitter"),
        ("[[random]]\nkind = 'pause'\nevery = 5\ncount = 2\n", 1, "needs a duration"),
        ("seed = 1\nrounds = 3\n", 2, "unknown key 'rounds'"),
        ("[[fault]]\nat = 1\nkind = 'kill'\npeer = 0\nat = 2\n", 5, "Cannot overwrite"),
        ("[[fault]]\nat = \nkind = 'kill'\n", 2, "Invalid value"),
    ],
)
def test_a_malformed_scenario_points_at_the_line(tmp_path, text, line, needle):
    msg = error_of(tmp_path, text)
    assert f"s.toml:{line}" in msg and needle in msg, msg


@pytest.mark.parametrize(
    "text",
    [
        "[[fault]]\nat = 1\nkind = 'kill'\npeer = 'peer-9'\n",
        "[[fault]]\nat = 1\nkind = 'pause'\npeer = 4\n",
        "[[fault]]\nat = 1\nkind = 'partition'\ngroups = [[0], ['nobody']]\n",
        "[[random]]\nkind = 'kill'\nevery = 5\ncount = 1\npeers = ['peer-1', 'ghost']\n",
    ],
)
def test_a_fault_at_a_peer_that_does_not_exist_is_an_error(tmp_path, text):
    msg = error_of(tmp_path, text)
    assert "no peer" in msg and "peer-0, peer-1, peer-2, peer-3" in msg and "s.toml:" in msg


def test_partition_groups_must_be_disjoint_and_at_least_two(tmp_path):
    bad = "[[fault]]\nat = 1\nkind = 'partition'\ngroups = [[0, 1], [1, 2]]\n"
    assert "more than one group" in error_of(tmp_path, bad)
    whole = "[[fault]]\nat = 1\nkind = 'partition'\ngroups = [[0, 1, 2, 3]]\n"
    assert "at least two groups" in error_of(tmp_path, whole)


def test_bad_flags_name_the_flag():
    with pytest.raises(ScenarioError, match=r"--fault #2 .*KEY=VALUE"):
        scenario_from_flags(["at=1 kind=kill peer=0", "at=2 kill"], [])
    with pytest.raises(ScenarioError, match=r"--random #1 .*unknown fault kind"):
        scenario_from_flags([], ["kind=boom every=1 count=1"])
    with pytest.raises(ScenarioError, match="NAME=PID@HOST:PORT"):
        parse_peer_flag("peer-0@127.0.0.1:7000")
    assert parse_peer_flag("p=12@10.0.0.1:7000") == ("p", {"pid": 12, "addr": "10.0.0.1:7000"})


def test_poison_faults_from_flags_and_files_end_when_their_time_is_up(tmp_path):
    flags = scenario_from_flags(
        [
            "at=0 kind=poison peer=peer-2 mode=zero",
            "at=1 kind=poison peer=3 mode=scale factor=0.5 for=4",
        ],
        [],
    )
    actions = [a.to_json() for a in plan(flags, NAMES)]
    assert actions == [
        {"at": 0.0, "fault": "poison", "peers": ["peer-2"], "mode": "zero", "source": ANY},
        {
            "at": 1.0,
            "fault": "poison",
            "peers": ["peer-3"],
            "factor": 0.5,
            "mode": "scale",
            "source": ANY,
        },
        {"at": 5.0, "fault": "unpoison", "peers": ["peer-3"], "source": ANY},
    ]
    text = "[[fault]]\nat = 1\nkind = 'poison'\npeer = 3\nmode = 'scale'\nfactor = 0.5\n"
    text += "duration = 4\n"
    from_file = plan(load_scenario(write(tmp_path, text)), NAMES)
    assert [(a.at, a.kind, a.mode, a.factor) for a in from_file] == [
        (1.0, "poison", "scale", 0.5),
        (5.0, "unpoison", None, None),
    ]
    randoms = plan(
        scenario_from_flags([], ["kind=poison mode=noise every=10 count=2 duration=3"], 1), NAMES
    )
    assert [a.kind for a in randoms] == ["poison", "unpoison"] * 2


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("at=0 kind=poison peer=0", "needs 'mode'"),
        ("at=0 kind=poison peer=0 mode=flip", "poison mode must be one of zero, negate"),
        ("at=0 kind=poison peer=0 mode=zero factor=3", "mode zero takes no factor"),
        ("at=0 kind=poison peer=0 mode=scale factor=0", "factor must be positive"),
        ("at=0 kind=poison peer=0 mode=noise factor=-2", "factor must be at least 0"),
        ("at=0 kind=unpoison peer=0 mode=zero", "unknown key 'mode'"),
    ],
)
def test_bad_poison_faults_are_refused_before_the_start(spec, needle):
    with pytest.raises(ScenarioError, match=needle):
        plan(scenario_from_flags([spec], []), NAMES)
    with pytest.raises(ScenarioError, match="random 'unpoison' makes no sense"):
        scenario_from_flags([], ["kind=unpoison every=5 count=1"])


def test_robust_mixing_settings_come_from_a_config_file_for_every_launched_peer(tmp_path):
    from trainer.launch.local import Child, peer_config_for

    path = write(
        tmp_path, "[gossip.robust]\nenabled = false\nrefuse_multiple = 6.0\n", "robust.toml"
    )
    args = build_parser().parse_args(["local", "--peers", "2", "--config", str(path)])
    child = Child(name="peer-0", index=0, addr="127.0.0.1:9", run_dir=tmp_path / "peer-0")
    robust = peer_config_for(args, child, 2, []).gossip.robust
    assert robust.enabled is False and robust.refuse_multiple == 6.0
    assert robust.clip_multiple == 2.0  # the rest keep their defaults
    assert parse_peer().gossip.robust.enabled is True


def test_every_example_scenario_is_valid():
    files = sorted((ROOT / "examples" / "scenarios").glob("*.toml"))
    assert len(files) >= 4
    for path in files:
        assert plan(load_scenario(path), NAMES), path


# -- peer configuration files --------------------------------------------------------------------


def parse_peer(*argv):
    return peer_config(build_parser().parse_args(["peer", *argv]))


def test_a_toml_file_fills_the_same_dataclasses_as_the_flags(tmp_path):
    path = write(
        tmp_path,
        """
name = "b"
listen = "0.0.0.0:7000"
advertise = "10.0.0.2:7000"
join = ["10.0.0.1:7000", "10.0.0.3:7000"]
index = 1
num_peers = 3
run_dir = "out/b"
profile = "lan"
linger_seconds = 4.0
allow_control = true
[train]
epochs = 2.5
lr = 0.01
seed = 9
[schedule]
period_steps = 7
[checkpoint]
directory = "ck/b"
every_steps = 40
""",
        "peer.toml",
    )
    from_file = parse_peer("--config", str(path))
    from_flags = parse_peer(
        "--name",
        "b",
        "--listen",
        "0.0.0.0:7000",
        "--advertise",
        "10.0.0.2:7000",
        "--join",
        "10.0.0.1:7000,10.0.0.3:7000",
        "--index",
        "1",
        "--num-peers",
        "3",
        "--run-dir",
        "out/b",
        "--profile",
        "lan",
        "--linger",
        "4",
        "--allow-control",
        "--epochs",
        "2.5",
        "--lr",
        "0.01",
        "--seed",
        "9",
        "--period",
        "7",
        "--checkpoint-dir",
        "ck/b",
        "--checkpoint-every",
        "40",
    )
    assert from_file == from_flags
    assert from_file.advertise == "10.0.0.2:7000" and from_file.listen == "0.0.0.0:7000"
    # Flags override the file.
    assert parse_peer("--config", str(path), "--index", "2").index == 2


def test_the_example_peer_config_loads():
    cfg = load_toml(ROOT / "examples" / "peer.toml")
    assert cfg.listen == "0.0.0.0:7000" and cfg.advertise == "10.0.0.2:7000"
    assert cfg.checkpoint.directory and cfg.train.dataset == "mnist"


def test_unknown_keys_in_a_peer_config_are_errors(tmp_path):
    path = write(tmp_path, "[train]\nepoch = 3\n", "peer.toml")
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_toml(path)


def test_gossip_flags_reach_the_peer_config():
    cfg = parse_peer("--period", "7", "--gossip-budget", "0.25", "--linger", "6.5")
    assert cfg.schedule.period_steps == 7
    assert cfg.schedule.time_budget == 0.25
    assert cfg.linger_seconds == 6.5


def test_the_launcher_hands_each_peer_its_complete_config_as_a_file(tmp_path):
    """What `local` writes for a peer reads back into the very same frozen dataclasses, and
    holds the run's flags plus where that peer stands."""
    from trainer.config import LaunchConfig, save_config
    from trainer.launch.local import Child, peer_config_for

    args = build_parser().parse_args(
        ["local", "--peers", "2", "--restart-failed", "--lr", "0.01", "--period", "9"]
    )
    child = Child(name="peer-1", index=1, addr="127.0.0.1:9", run_dir=tmp_path / "peer-1")
    cfg = peer_config_for(args, child, 2, ["127.0.0.1:8"])
    path = save_config(cfg, tmp_path / "config.json")
    back = load_toml(path)
    assert back == cfg
    assert (back.name, back.index, back.num_peers, back.join) == ("peer-1", 1, 2, ("127.0.0.1:8",))
    assert back.train.lr == 0.01 and back.schedule.period_steps == 9
    assert back.checkpoint.directory == str(tmp_path / "peer-1" / "checkpoints")
    assert back.linger_seconds == LaunchConfig.linger and back.train.threads >= 1
    # The same file drives `gossip-train peer --config`: flags given there still override.
    assert parse_peer("--config", str(path), "--lr", "0.5").train.lr == 0.5


def test_a_restarted_peer_joins_through_unfinished_peers_without_the_launch_waits(tmp_path):
    from types import SimpleNamespace

    from trainer.config import PeerConfig
    from trainer.launch.local import LAUNCH_JOIN_TIMEOUT, Child, LocalRun, peer_config_for

    args = build_parser().parse_args(["local", "--peers", "3", "--restart-failed"])
    child = Child(name="peer-1", index=1, addr="127.0.0.1:9", run_dir=tmp_path / "peer-1")
    first = peer_config_for(args, child, 3, [])
    assert first.wait_peers == 3 and first.join_timeout == LAUNCH_JOIN_TIMEOUT
    child.restarts = 1
    again = peer_config_for(args, child, 3, [])
    assert again.wait_peers == 1 and again.join_timeout == PeerConfig().join_timeout

    finished = Child(name="peer-0", index=0, addr="127.0.0.1:8", run_dir=tmp_path / "peer-0")
    finished.proc = SimpleNamespace(returncode=0)  # type: ignore[assignment]
    finished.result = {"status": "finished"}
    killed = Child(name="peer-2", index=2, addr="127.0.0.1:10", run_dir=tmp_path / "peer-2")
    killed.proc = SimpleNamespace(returncode=-9)  # type: ignore[assignment]
    run = SimpleNamespace(children=[finished, child, killed], _finished=LocalRun._finished)
    assert LocalRun._seeds_for(run, child) == ["127.0.0.1:10"]  # type: ignore[arg-type]
    finished.proc = SimpleNamespace(returncode=None)  # still lingering: it answers
    assert LocalRun._seeds_for(run, child) == ["127.0.0.1:8", "127.0.0.1:10"]  # type: ignore[arg-type]
