"""Bad input through the real command line: one clear line, exit 2, no traceback."""

import gzip
import shutil
import socket
import subprocess

from conftest import ROOT, assert_one_line_error, cli


def run(*args, timeout=60):
    proc = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_wrong_data_dir(tmp_path):
    rc, _, err = run("peer", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"))
    assert_one_line_error(rc, err, "nope")


def test_corrupt_idx_file(tmp_path, mnist_dir):
    for f in mnist_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x27\x10" + b"\x01" * 100))
    rc, _, err = run("peer", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert_one_line_error(rc, err, "t10k-labels")


def test_port_in_use():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        rc, _, err = run("peer", "--listen", f"127.0.0.1:{port}", "--epochs", "0.01")
        assert_one_line_error(rc, err, f"127.0.0.1:{port}", "in use")
    finally:
        s.close()


def test_join_address_nobody_answers():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc, _, err = run(
        "peer", "--join", f"127.0.0.1:{port}", "--join-timeout", "2", "--epochs", "0.01"
    )
    assert_one_line_error(rc, err, f"127.0.0.1:{port}")


def test_bad_addresses_and_partition_are_usage_errors():
    rc, _, err = run("peer", "--join", "nohost", "--epochs", "0.01")
    assert_one_line_error(rc, err, "nohost")
    rc, _, err = run("peer", "--partition", "dirichlet:-1")
    assert_one_line_error(rc, err, "ALPHA")
    rc, _, err = run("peer", "--gossip-budget", "-1")
    assert_one_line_error(rc, err, "--gossip-budget must be between 0 and 64")
    rc, _, err = run("peer", "--linger", "-1")
    assert_one_line_error(rc, err, "--linger must not be negative")


def test_eval_of_a_missing_file(tmp_path):
    rc, _, err = run("eval", str(tmp_path / "missing.pt"))
    assert_one_line_error(rc, err, "missing.pt")


def test_local_with_a_wrong_data_dir_fails_once_before_starting_peers(tmp_path):
    rc, _, err = run(
        "local",
        "--peers",
        "3",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "nope"),
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert_one_line_error(rc, err, "nope")
    assert not (tmp_path / "run" / "peer-0").exists()


def test_join_dns_name_that_does_not_resolve():
    rc, _, err = run(
        "peer", "--join", "dns:no-such-host.invalid:7000", "--join-timeout", "1", "--epochs", "0.01"
    )
    assert_one_line_error(rc, err, "dns:no-such-host.invalid:7000")


def test_slurm_with_an_empty_node_list(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-")
    rc, _, err = run("peer", "--slurm", "--epochs", "0.01")
    assert_one_line_error(rc, err, "bad host list", "n[1-")
