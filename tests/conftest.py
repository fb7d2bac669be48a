"""Shared by every tier: tests/unit (pure logic, fake clocks), tests/sim (the in-memory
network and discrete-event simulations), tests/real (real sockets, processes, files of runs).
Test modules import these helpers with ``from conftest import ...`` from any tier."""

import os
import subprocess
import sys
from pathlib import Path

import loop_guard
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "sim", "real")
# The launchers' report.html costs a few seconds of plotting per run; only the tests of the
# report ask for it (tests/real/test_report.py passes GOSSIP_TRAIN_REPORT=1).
os.environ.setdefault("GOSSIP_TRAIN_REPORT", "0")


def shared_data(name: str) -> Path:
    """Path of a shared real data set; skipped locally when absent, a failure under CI."""
    path = SHARED_DATA / name
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"data set {path} is missing (required under CI=true)")
        pytest.skip(f"data set {path} not present")
    return path


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """A user's mistake: exit status 2, no traceback, one error line holding ``needles``."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "gossip-train: error:" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def apt_install(*args: str) -> None:
    """``apt-get update``, then ``apt-get install -y -q ARGS`` (non-interactive); a failure
    of either fails the test with apt's last words. For the tests that install the system
    service they need (Slurm, dnsmasq) from Debian's packages."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *args]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


@pytest.fixture
def mnist_dir() -> Path:
    return shared_data("mnist")


def pytest_configure(config: pytest.Config) -> None:
    # Every asyncio test fails on an unhandled loop exception or a leaked task (loop_guard.py).
    config.pluginmanager.register(loop_guard, "loop_guard")


def tier_of(path: Path) -> str | None:
    """The tier folder a test file lives in, None outside tests/<tier>/."""
    try:
        parts = path.resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Test files are imported by basename (rootdir-relative sys.path): two of one name in
    different tiers break the run that collects both, so say so whichever tier runs."""
    seen: dict[str, Path] = {}
    for path in sorted(TESTS.glob("*/test_*.py")):
        other = seen.setdefault(path.name, path)
        if other != path:
            rel = [str(p.relative_to(TESTS.parent)) for p in (other, path)]
            raise pytest.UsageError(f"{rel[0]} and {rel[1]}: test files need distinct names")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test sits in a tier, and only tests/real starts real peer processes."""
    for item in items:
        tier = tier_of(item.path)
        if tier is None and item.path.resolve().is_relative_to(TESTS):
            raise pytest.UsageError(f"{item.nodeid}: test files go in tests/{{{','.join(TIERS)}}}/")
        if item.get_closest_marker("real") and tier not in (None, "real"):
            raise pytest.UsageError(f"{item.nodeid}: marked real, so it belongs in tests/real/")
