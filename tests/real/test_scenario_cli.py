"""Bad fault scenarios stop `gossip-train local` and `gossip-train chaos` before anything starts."""

import subprocess

from conftest import ROOT, cli


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_scenarios_fail_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    bad = write(tmp_path, "[[fault]]\nat = 1\nkind = 'kill'\npeer = 7\n")
    for extra in (["--chaos", str(bad)], ["--fault", "at=1 kind=pause peer=peer-3 for=2"]):
        proc = subprocess.run(
            cli("local", "--peers", "3", "--run-dir", str(run_dir), "--no-progress", *extra),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "no peer" in proc.stderr, proc.stderr
        assert not run_dir.exists(), "nothing may be created or started"
    garbled = write(tmp_path, "[[fault]\nat = 1\n", "garbled.toml")
    proc = subprocess.run(
        cli("chaos", str(garbled), "--peer", "p=1@127.0.0.1:9"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "garbled.toml:1" in proc.stderr, proc.stderr
