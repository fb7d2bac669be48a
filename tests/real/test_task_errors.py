"""Bad tasks through the real command line: one line naming the problem, exit 2, nothing
overwritten."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from test_cli_errors import run

GOOD = """
    import torch
    from torch.utils.data import TensorDataset

    def model():
        return torch.nn.Linear(4, 2)

    def data(peer, peers):
        x = torch.randn(64, 4)
        return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x, (x[:, 0] > 0).long())
"""


def task_file(tmp_path: Path, extra: str = "", body: str = GOOD) -> str:
    path = tmp_path / "my_task.py"
    path.write_text(textwrap.dedent(body) + textwrap.dedent(extra))
    return str(path)


def test_a_task_file_that_does_not_exist(tmp_path: Path) -> None:
    rc, _, err = run(
        "local", "--task", str(tmp_path / "nope.py"), "--run-dir", str(tmp_path / "run")
    )
    assert_one_line_error(rc, err, "nope.py", "no such file")
    assert not (tmp_path / "run" / "peer-0").exists()


def test_a_task_without_model_or_data(tmp_path: Path) -> None:
    path = tmp_path / "t.py"
    path.write_text("def data(peer, peers):\n    return None, None\n")
    rc, _, err = run("peer", "--task", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, "t.py", "defines no model() function")
    path.write_text("def model():\n    return None\n")
    rc, _, err = run("local", "--task", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, "t.py", "defines no data() function")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("def data(peer, peers):\n    return 'abc'\n", "returned str; it must return"),
        (
            "def loss(model, batch):\n    return model(batch[0]).sum(dim=1)\n",
            "loss() returned a tensor of shape [8]",
        ),
        ("def optimizer(params):\n    return 3\n", "optimizer() returned int"),
    ],
)
def test_a_task_that_returns_the_wrong_thing(tmp_path: Path, extra: str, needle: str) -> None:
    path = task_file(tmp_path, extra)
    rc, _, err = run(
        "peer", "--task", path, "--batch-size", "8", "--run-dir", str(tmp_path / "run")
    )
    assert_one_line_error(rc, err, needle)


def test_a_non_finite_loss_stops_the_peer_and_says_so(tmp_path: Path) -> None:
    extra = """
    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y) / 0.0 * 0.0
    """
    path = task_file(tmp_path, extra)
    rc, _, err = run("peer", "--task", path, "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, "loss is nan at step 1", "shares no more weights")
    assert not (tmp_path / "run" / "final.pt").exists()


def test_a_checkpoint_of_another_task_is_refused_and_kept(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    rc, _, err = run(
        "peer", "--steps", "5", "--checkpoint-dir", str(ckpt), "--run-dir", str(tmp_path / "a")
    )
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    path = task_file(tmp_path)
    rc, _, err = run(
        "peer", "--task", path, "--checkpoint-dir", str(ckpt), "--run-dir", str(tmp_path / "b")
    )
    assert_one_line_error(rc, err, "was written for task 'classifier'", "runs task 'my_task'")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    newest = sorted(ckpt.iterdir())[-1]
    rc, _, err = run("eval", str(newest), "--task", path)
    assert_one_line_error(rc, err, "written by task 'classifier', not 'my_task'")
    rc, _, err = run("eval", str(tmp_path / "a" / "final.pt"), "--task", "shakespeare")
    assert_one_line_error(rc, err, "not a model of task 'shakespeare'")
