"""Monitoring through the real command line: a 2-peer `local --metrics --tensorboard` run
scraped while it trains, and the one-line errors of bad monitoring flags."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
from conftest import ROOT, assert_one_line_error, cli
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.real


def free_base(n: int) -> int:
    """A port with the n - 1 after it free too (now)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free consecutive ports")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_local_run_serves_metrics_and_writes_tensorboard(tmp_path):
    run_dir, board = tmp_path / "run", tmp_path / "tb"
    base = free_base(2)
    argv = ["local", "--peers", "2", "--steps", "600", "--eval-every", "100", "--period", "5"]
    argv += ["--run-dir", str(run_dir), "--metrics", str(base), "--tensorboard", str(board)]
    proc = subprocess.Popen(
        cli(*argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        urls = json.loads((run_dir / "metrics.json").read_text())
        assert urls == {f"peer-{i}": f"http://127.0.0.1:{base + i}/metrics" for i in range(2)}
        first = None
        while first is None or first["gossip_train_steps_total"] == 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            try:
                first = scrape(urls["peer-0"])
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        second = first
        while second["gossip_train_steps_total"] == first["gossip_train_steps_total"]:
            time.sleep(0.2)
            second = scrape(urls["peer-0"])  # still training: its steps cannot all be done
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert 0 < first["gossip_train_steps_total"] < second["gossip_train_steps_total"] <= 600
    assert first["gossip_train_samples_total"] < second["gossip_train_samples_total"]
    sent = "gossip_train_bytes_total{direction=sent,kind=membership}"
    assert first[sent] < second[sent]
    done = "gossip_train_exchanges_total{event=completed}"
    assert first[done] <= second[done]
    assert second["gossip_train_total_steps"] == 600
    members = [second[f"gossip_train_members{{state={s}}}"] for s in ("alive", "suspect", "left")]
    assert sum(members) == 1  # the other peer (alive, or gone if it has finished)
    assert "gossip_train_peer_info{addr=" in "".join(second)
    # Files of the run: where the metrics were, for people and for Prometheus (file_sd).
    assert json.loads((run_dir / "run.json").read_text())["metrics"] == urls
    targets = json.loads((run_dir / "prometheus-targets.json").read_text())
    assert [t["targets"] for t in targets] == [[f"127.0.0.1:{base + i}"] for i in range(2)]
    assert "consensus: averaging" in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("peer-0", "peer-1"):
        acc = EventAccumulator(str(board / name))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/exchanges", "bytes/weights_sent", "eval/accuracy"} <= tags
        assert {"final/accuracy", "final/headline"} <= tags
        losses = acc.Scalars("train/loss")
        assert len(losses) >= 2 and losses[-1].step > losses[0].step
        assert acc.Scalars("train/exchanges")[-1].value > 0


def run(*args, env=None):
    proc = subprocess.run(
        cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    return proc.returncode, proc.stderr


def test_bad_monitoring_flags_are_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err = run("local", "--peers", "2", "--run-dir", str(tmp_path / "r"), "--metrics",
                      str(port))  # fmt: skip
        assert_one_line_error(rc, err, f"--metrics {port}", f"port {port}")
        rc, err = run("peer", "--metrics-port", str(port), "--steps", "5",
                      "--run-dir", str(tmp_path / "p"))  # fmt: skip
        assert_one_line_error(rc, err, f"--metrics-port {port}", "cannot listen")
    rc, err = run("peer", "--metrics-port", "70000")
    assert_one_line_error(rc, err, "--metrics-port 70000", "1..65535")
    rc, err = run("local", "--metrics", "65535", "--peers", "2", "--run-dir", str(tmp_path / "q"))
    assert_one_line_error(rc, err, "--metrics 65535", "65536")


def test_missing_packages_name_the_extra(tmp_path):
    # Modules that fail to import stand in for packages that are not installed.
    for name in ("prometheus_client", "tensorboard"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path}
    rc, err = run("peer", "--metrics-port", "9400", env=env)
    assert_one_line_error(rc, err, "prometheus_client", "gossip-train[metrics]")
    rc, err = run("peer", "--tensorboard", str(tmp_path / "tb"), env=env)
    assert_one_line_error(rc, err, "tensorboard", "gossip-train[tensorboard]")
    rc, err = run("local", "--metrics", "--run-dir", str(tmp_path / "r"), env=env)
    assert_one_line_error(rc, err, "--metrics needs", "gossip-train[metrics]")
