import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a shared real data set; skipped locally when absent, a failure under CI."""
    path = SHARED_DATA / name
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"data set {path} is missing (required under CI=true)")
        pytest.skip(f"data set {path} not present")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


@pytest.fixture
def mnist_dir() -> Path:
    return shared_data("mnist")
