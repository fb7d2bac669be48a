"""The slow-link benchmark's pure parts (benchmarks/slowlink.py): the tbf arguments of a cap,
the configuration table against a --help text, links, the event tail and the veth counters."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.chaos.netns import MIN_BURST, tbf_args
from trainer.cli import build_parser

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # its own imports: common, tta, transformer
    spec = importlib.util.spec_from_file_location("gossip_slowlink", BENCH / "slowlink.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


slowlink = _load()


def test_a_cap_is_a_tbf_with_a_bucket_of_20_ms_of_its_rate_and_at_least_16_kib() -> None:
    assert tbf_args("10mbit", "200ms") == [
        "root", "tbf", "rate", "10mbit", "burst", "25000", "latency", "200ms",
    ]  # fmt: skip
    assert tbf_args("100mbit", "50ms")[5] == "250000"
    assert tbf_args("1mbit", "200ms")[5] == str(MIN_BURST)  # 2,500 bytes would hold no frame
    with pytest.raises(ValueError):
        tbf_args("fast", "200ms")


def test_links_are_unlimited_or_a_tc_rate() -> None:
    assert slowlink.link_rate("unlimited") is None
    assert slowlink.link_rate("10mbit") == "10mbit"
    with pytest.raises(ValueError):
        slowlink.link_rate("10 megabits")


HELP = """usage: gossip-train local [-h] [--peers PEERS] [--compress {fp16,bf16,int8}]
  --period PERIOD       local steps between exchanges (default 20)
  --netns-rate RATE     with --netns, cap every peer's link
"""


def test_help_flags_and_the_configurations_they_allow() -> None:
    known = slowlink.help_flags(HELP)
    assert {"-h"}.isdisjoint(known)
    assert {"--peers", "--compress", "--period", "--netns-rate", "--netns"} <= known
    assert slowlink.missing_flags(("--compress", "int8", "--outer-steps", "500"), known) == [
        "--outer-steps"
    ]
    ok, skipped = slowlink.runnable(["fp32", "int8", "outer", "outer+int8"], known)
    assert ok == ["fp32", "int8"]
    assert skipped["outer"] == ["--outer-steps", "--outer-lr", "--outer-momentum"]
    assert skipped["outer+int8"] == ["--outer-steps", "--outer-lr", "--outer-momentum"]


def test_this_checkout_runs_fp32_and_knows_the_flags_the_harness_passes() -> None:
    local = next(
        a for a in build_parser()._actions if getattr(a, "choices", None) and "local" in a.choices
    ).choices["local"]
    known = slowlink.help_flags(local.format_help())
    ok, _ = slowlink.runnable(list(slowlink.CONFIGS), known)
    assert "fp32" in ok
    for task in slowlink.make_tasks(quick=True, data="/data").values():
        assert slowlink.missing_flags(task.gossip, known) == []
    assert slowlink.missing_flags(["--netns", "--netns-rate", "--linger", "--threads"], known) == []


def test_the_tail_returns_whole_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = slowlink.Tail(path)
    assert tail.read() == []  # not there yet
    path.write_bytes(b'{"kind": "eval", "ts": 1}\n{"kind": "pro')
    assert tail.read() == [{"kind": "eval", "ts": 1}]
    with open(path, "ab") as fh:
        fh.write(b'gress"}\n')
    assert tail.read() == [{"kind": "progress"}]
    assert tail.read() == []


def test_targets_higher_or_lower_is_better() -> None:
    mnist = slowlink.make_tasks(quick=False, data="/data")["mnist"]
    lm = slowlink.make_tasks(quick=False, data="/data")["shakespeare"]
    assert mnist.hit(0.975) and not mnist.hit(0.97) and not mnist.hit(None)
    assert lm.hit(1.9) and not lm.hit(1.91)
    assert mnist.worst([0.98, 0.97, None]) == 0.97 and lm.worst([1.8, 1.95]) == 1.95
    assert "--eval-every" in mnist.gossip and mnist.gossip[mnist.gossip.index("--eval-every") + 1]
    assert json.dumps(slowlink.CONFIGS)  # the table goes into the JSON as it is


def test_veth_counters_interpolate_at_the_target() -> None:
    c = slowlink.Counters()
    c.samples = [(10.0, [(0, 0), (100, 0)]), (12.0, [(200, 200), (100, 100)])]
    assert c.at(11.0) == [200.0, 150.0]
    assert c.at(None) == [400.0, 200.0]
    assert c.at(20.0) == [400.0, 200.0]  # after the last sample: the last sample


def test_a_link_rate_without_namespaces_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    from trainer.launch.local import LocalRun

    run_dir = tmp_path / "run"
    args = build_parser().parse_args(["local", "--netns-rate", "10mbit", "--run-dir", str(run_dir)])
    with pytest.raises(ValueError, match="--netns-rate needs --netns"):
        LocalRun(args)
    assert not run_dir.exists()


def test_the_matrix_reports_each_finished_run_and_gives_ddp_its_own_budget(monkeypatch) -> None:
    ran: list[tuple[str, str, float]] = []

    def ddp_run(task: Any, link: str) -> dict[str, Any]:
        ran.append(("ddp", link, task.timeout))
        return {"reached": False, "time_to_target_s": None}

    def gossip_job(task: Any, config: str, link: str, *rest: Any) -> dict[str, Any]:
        ran.append((config, link, task.timeout))
        return {"reached": True, "time_to_target_s": 1.0}

    monkeypatch.setattr(slowlink, "ddp_run", ddp_run)
    monkeypatch.setattr(slowlink, "gossip_job", gossip_job)
    monkeypatch.setattr(slowlink, "row", lambda results: {"n": len(results)})
    monkeypatch.setattr(slowlink, "ratios", lambda plan, reps, rows: {})
    plan = slowlink.Plan(("mnist",), ("fp32",), ("10mbit",), ("10mbit",), ddp_timeout=5.0)
    tasks = {"mnist": slowlink.replace(slowlink.make_tasks(False, "/d")["mnist"], timeout=99.0)}
    seen: list[int] = []
    slowlink.measure(plan, tasks, None, lambda reps: seen.append(sum(map(len, reps.values()))))
    assert ran == [("ddp", "10mbit", 5.0), ("fp32", "10mbit", 99.0)]
    assert seen == [1, 2]  # after each run, everything finished so far
