"""report.html of a real chaos run: 4 peers, one killed (and restarted), a partition and its
heal, through the fault-injecting proxy on loopback. Every plot is there and drawn, and the
tables say what summary.json and report.json say."""

import json
import os
import subprocess

import pytest
from conftest import ROOT, cli
from report_page import PLOTS, assert_drawn_png, assert_peer_table_matches, need_matplotlib, parse

pytestmark = pytest.mark.real


def cell(x):
    return "-" if x is None else f"{x:.2f}"


def test_a_chaos_run_ends_with_a_report_of_every_plot(tmp_path):
    need_matplotlib()
    run_dir = tmp_path / "run"
    # Long enough that the killed peer is back (restart delay 3 s) and the partition healed
    # (at 9 s) well before the others finish, on a fast machine too.
    argv = ["local", "--peers", "4", "--epochs", "120", "--eval-every", "100"]
    argv += ["--run-dir", str(run_dir), "--no-progress", "--proxy"]
    argv += ["--restart-failed", "--checkpoint-seconds", "1", "--restart-delay", "3"]
    argv += ["--fault", "at=1 kind=kill peer=peer-1"]
    argv += ["--fault", "at=5 kind=partition groups=0,1/2,3 for=4"]
    env = {**os.environ, "GOSSIP_TRAIN_REPORT": "1"}
    proc = subprocess.run(
        cli(*argv), cwd=ROOT, capture_output=True, text=True, timeout=400, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page_path = run_dir / "report.html"
    assert f"report: {page_path}" in proc.stdout
    assert sum("report: drawing 6 plots of 4 peers" in ln for ln in proc.stderr.splitlines()) == 1

    doc = parse(page_path)
    assert doc.scripts == 0 and set(doc.images) == PLOTS
    for src in doc.images.values():
        assert_drawn_png(src)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert_peer_table_matches(doc.tables["peers"], summary)
    assert [p["restarts"] for p in summary["peers"]] == [0, 1, 0, 0]

    # The chaos report's tables, row for row.
    report = json.loads((run_dir / "report.json").read_text())
    faults = doc.tables["faults"][1:]
    expect = [(f"{f['t']:.1f}", f["fault"]) for f in report["faults"]]
    assert [(r[0], r[1]) for r in faults] == expect
    kill = next(r for r in faults if r[1] == "kill")
    row = next(f for f in report["faults"] if f["fault"] == "kill")
    assert (kill[3], kill[6]) == (cell(row.get("detected_s")), cell(row.get("back_s")))
    quality = doc.tables["quality"][1:]
    assert [r[0] for r in quality] == [p["name"] for p in report["quality"]["peers"]] + [
        "consensus"
    ]
    for r, p in zip(quality, report["quality"]["peers"], strict=False):
        assert r[3] == f"{p['value']:.4f}"

    # What the plots drew from: disagreement on progress lines, membership seen changing.
    progress = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert any(isinstance(e.get("disagreement"), float) for e in progress)
    kinds = {e["kind"] for e in summary["events"] if e.get("subject") == "peer-1"}
    assert {"suspect", "alive"} <= kinds
