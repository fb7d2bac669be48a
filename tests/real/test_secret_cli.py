"""The cluster secret through the real command line: safe defaults, one-line errors for bad
secret files, and a stranger (no secret, or the wrong one) that cannot get into a run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error, cli

pytestmark = pytest.mark.real


def run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_secret_prints_a_new_random_line_each_time() -> None:
    outs = {run("secret")[1].strip() for _ in range(2)}
    assert len(outs) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", s) for s in outs)


def test_bad_secret_files_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    short = tmp_path / "short"
    short.write_text("0123456789abcdef0123\ntoo-short\n")
    for path, needle in (
        (tmp_path / "missing", "no such file"),
        (empty, "no secret in it"),
        (short, "line 2: a secret must be at least 16 bytes"),
    ):
        rc, _, err = run("peer", "--secret-file", str(path), "--steps", "1")
        assert_one_line_error(rc, err, str(path), needle)
    unreadable = tmp_path / "dir-not-file"
    unreadable.mkdir()
    rc, _, err = run("members", "--peer", "127.0.0.1:9", "--secret-file", str(unreadable))
    assert_one_line_error(rc, err, "cannot read")


def test_a_reachable_peer_needs_a_secret_or_insecure(tmp_path: Path) -> None:
    rc, _, err = run("peer", "--listen", "0.0.0.0:0", "--steps", "5", "--run-dir", str(tmp_path))
    assert_one_line_error(rc, err, "--secret-file", "--insecure")
    rc, out, err = run(
        "peer", "--listen", "0.0.0.0:0", "--steps", "5", "--insecure", "--run-dir", str(tmp_path)
    )
    assert rc == 0, err
    assert "5 steps" in out


def test_a_stranger_cannot_join_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(
            # Long enough to outlast the checks on any machine; stopped once they are done.
            cli("local", "--peers", "2", "--steps", "1000000", "--run-dir", str(run_dir),
                "--no-progress"),
            cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "peers.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        addr = json.loads((run_dir / "peers.json").read_text())["peers"][0]["addr"]
        assert (run_dir / "secret").stat().st_mode & 0o077 == 0  # the owner's alone
        # The run's own secret lets a caller in (members asks a peer what it sees) ...
        rc, out, err = run(
            "members", "--peer", addr, "--secret-file", str(run_dir / "secret"), "--json"
        )
        assert rc == 0, err
        assert {m["name"] for m in json.loads(out)["members"]} <= {"peer-0", "peer-1"}
        # ... and nothing else does.
        wrong = tmp_path / "wrong.key"
        wrong.write_text(run("secret")[1])
        for extra in ([], ["--secret-file", str(wrong)]):
            rc, _, err = run(
                "peer", "--join", addr, "--steps", "50", "--join-timeout", "5",
                "--run-dir", str(tmp_path / "stranger"), *extra,
            )  # fmt: skip
            assert_one_line_error(rc, err, addr, "authentication failed")
        launcher.send_signal(signal.SIGTERM)  # both peers stop cleanly (Ctrl-C does the same)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    # 130: interrupted, as after Ctrl-C; the peers stopped cleanly and the summary is written.
    assert launcher.returncode == 130, (tmp_path / "launcher.log").read_text()[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["status"] for p in summary["peers"]] == ["stopped", "stopped"]
    assert all(p["test_accuracy"] > 0.85 for p in summary["peers"])  # they trained meanwhile
    # Nobody but the two peers ever became a member.
    joined = {e.get("subject") for e in summary["events"] if e["kind"] == "joined"}
    assert joined <= {"peer-0", "peer-1"}, joined
