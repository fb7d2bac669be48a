"""A poisoning peer among honest ones, through the real command (bundled MNIST subset)."""

import json
import re
import subprocess

import pytest
from conftest import ROOT, cli

pytestmark = pytest.mark.real


def test_one_peer_poisoning_from_the_start_cannot_drag_the_honest_ones(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "local",
            "--peers",
            "3",
            "--steps",
            "375",
            "--linger",
            "20",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--fault",
            "at=0 kind=poison peer=peer-2 mode=zero",
            "--baseline",
            "auto",  # the same run without the poisoner first, in RUN_DIR/baseline
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    baseline = json.loads((run_dir / "baseline" / "summary.json").read_text())
    peers = {p["name"]: p for p in summary["peers"]}
    before = {p["name"]: p for p in baseline["peers"]}
    assert [p["status"] for p in peers.values()] == ["finished"] * 3
    assert peers["peer-2"]["poisoned"] == "zero" and peers["peer-2"]["test_accuracy"] < 0.2
    for name in ("peer-0", "peer-1"):
        # Comparable to the run without a poisoner (there each peer also had peer-2's data).
        assert peers[name]["test_accuracy"] >= before[name]["test_accuracy"] - 0.03, peers[name]
        assert peers[name]["test_accuracy"] >= 0.85, peers[name]
        assert peers[name]["screening"]["quarantines"] >= 1
    events = summary["events"]
    refused = [e for e in events if e["kind"] == "refused"]
    quarantined = [e for e in events if e["kind"] == "quarantined"]
    assert refused and all(e["subject"] == "peer-2" for e in refused)  # no false alarm
    assert {e["peer"] for e in quarantined} == {"peer-0", "peer-1"}
    assert all(e["subject"] == "peer-2" and e["seconds"] > 0 for e in quarantined)
    # The poison is what peer-2 ends with: it is not part of the consensus model.
    assert json.loads((run_dir / "consensus.json").read_text())["peers"] == ["peer-0", "peer-1"]
    assert summary["consensus_test_accuracy"] >= 0.85
    report = json.loads((run_dir / "report.json").read_text())
    assert report["invariants_ok"], report["invariants"]
    assert report["poisoning"]["honest_refused"] == 0
    text = (run_dir / "report.md").read_text()
    assert "## Poisoning and robust mixing" in text
    assert re.search(r"\| peer-2 \| [0-9.]+-end zero \|", text), text


def test_a_cured_peer_takes_a_neighbours_weights_and_ends_with_the_others(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "local",
            "--peers",
            "3",
            "--steps",
            "4000",
            "--linger",
            "30",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--fault",
            "at=0 kind=poison peer=peer-2 mode=negate for=1",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    peers = {p["name"]: p for p in summary["peers"]}
    assert all(p["status"] == "finished" and p["poisoned"] is None for p in peers.values())
    events = [e for e in summary["events"] if e.get("peer") == "peer-2"]
    modes = [e["mode"] for e in events if e["kind"] == "poison"]
    assert modes == ["negate", "none"]
    cured = next(e for e in events if e["kind"] == "poison" and e["mode"] == "none")
    assert cured["was"] == "negate" and cured["resynced_from"]
    assert any(e["kind"] == "caught_up" and e.get("resync") for e in events)
    # Cured, it is an honest peer again: in the consensus, and at it.
    assert json.loads((run_dir / "consensus.json").read_text())["peers"] == [
        "peer-0",
        "peer-1",
        "peer-2",
    ]
    for p in peers.values():
        assert p["test_accuracy"] >= 0.88, p
    # Not asserted: that it ends at the consensus. The honest peers cannot tell a cured
    # peer from a poisoner; its first updates after the cure (a period of its own steps
    # from the weights it took) can still be refused, and the second quarantine lasts
    # 20 s, longer than this run (docs/security.md, "What it bounds").
    report = json.loads((run_dir / "report.json").read_text())
    assert "converged" in report["invariants"]
