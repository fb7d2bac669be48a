"""Real peer processes on 127.0.0.1 training on real data (the bundled MNIST subset)."""

import json
import subprocess
import time

import pytest
from conftest import ROOT, cli

pytestmark = pytest.mark.real


def assert_bytes_by_kind(p):
    """A peer's bytes by kind: weights outweigh membership, which is not nothing, and the
    kinds add up to the totals. Received, a sealed record (the run has a secret) counts
    under its kind once it is opened, so a frame still in flight when the peer wrote its
    record may be missing from the kinds: a few records at most."""
    kinds = p["bytes"]
    assert set(kinds) == {"weights", "membership", "control"}, kinds
    both = {k: v["sent"] + v["received"] for k, v in kinds.items()}
    assert both["weights"] > both["membership"] > 0 and both["control"] > 0, kinds
    assert sum(v["sent"] for v in kinds.values()) == p["bytes_sent"], p
    missing = p["bytes_received"] - sum(v["received"] for v in kinds.values())
    assert 0 <= missing <= 4 << 20, p
    assert p["compression_ratio"] == 1.0
    assert p["payload_bytes"]["raw"] == p["payload_bytes"]["wire"] > 0


def test_local_peers_train_and_agree(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "local",
            "--peers",
            "3",
            "--epochs",
            "3",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--period",
            "20",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    peers = summary["peers"]
    assert [p["status"] for p in peers] == ["finished"] * 3
    for p in peers:
        # 4,000 images per peer, 3 epochs: alone a peer would see a third of the data;
        # averaging gives each the benefit of all of it.
        assert p["test_accuracy"] >= 0.88, p
        assert p["exchanges"] > 0 and p["bytes_sent"] > 0 and p["bytes_received"] > 0
        assert p["steps"] == 3 * 125  # ceil(4000 / 32) per epoch
        assert_bytes_by_kind(p)
    assert summary["bytes"]["weights"]["sent"] == sum(p["bytes"]["weights"]["sent"] for p in peers)
    assert summary["compression_ratio"] == 1.0
    assert summary["consensus_test_accuracy"] >= 0.88
    assert (run_dir / "consensus.pt").is_file() and (run_dir / "consensus.json").is_file()
    kinds = {e["kind"] for e in summary["events"]}
    assert {"spawned", "listening", "started", "finished", "joined"} <= kinds
    assert "consensus model: accuracy" in proc.stdout
    # The consensus model evaluates through the CLI to the same number.
    ev = subprocess.run(
        cli("eval", str(run_dir / "consensus.pt")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ev.returncode == 0, ev.stderr
    assert f"{summary['consensus_test_accuracy']:.4f}" in ev.stdout


def test_a_peer_with_another_model_is_refused_clearly(tmp_path):
    first = subprocess.Popen(
        cli(
            "peer",
            "--listen",
            "127.0.0.1:0",
            "--epochs",
            "50",
            "--events",
            "jsonl",
            "--run-dir",
            str(tmp_path / "a"),
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        addr = None
        deadline = time.time() + 60
        while addr is None and time.time() < deadline:
            line = first.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            if ev["kind"] == "listening":
                addr = ev["addr"]
        assert addr, "first peer did not start"
        second = subprocess.run(
            cli(
                "peer",
                "--join",
                addr,
                "--model",
                "cnn",
                "--epochs",
                "1",
                "--run-dir",
                str(tmp_path / "b"),
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert "does not match ours" in second.stderr
        # It names the first tensor that differs: the MLP's first Linear, the CNN's conv.
        assert "ours is 1.weight [128, 784]" in second.stderr, second.stderr
        assert "yours is 0.weight [16, 1, 3, 3]" in second.stderr
        assert first.poll() is None, "the first peer must survive"
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
