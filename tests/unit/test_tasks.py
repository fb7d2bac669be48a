"""Tasks in one process: loading and checking, what is averaged, batching, exact resume."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gossip.outer import OuterConfig, OuterStore
from trainer.config import CheckpointConfig, TrainConfig
from trainer.data import Batches
from trainer.evaluate import average_states
from trainer.loop import NonFiniteLoss, Trainer
from trainer.task import TaskError, call_with_context, load_task
from trainer.weights import FlatWeights, ModelError


def write_task(tmp_path: Path, body: str, name: str = "task.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


TOY = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def model():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def data(peer, peers, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(96, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return TensorDataset(x[peer::peers], y[peer::peers]), TensorDataset(x, y)
""")


# -- loading and checking ------------------------------------------------------------------
def test_missing_file_and_missing_functions_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "nope.py"))
    with pytest.raises(TaskError, match="not a built-in task"):
        load_task("no-such-task")
    no_data = write_task(tmp_path, "def model():\n    return None\n", "no_data.py")
    with pytest.raises(TaskError, match=r"defines no data\(\) function"):
        load_task(no_data)
    broken = write_task(tmp_path, "def model(:\n", "broken.py")
    with pytest.raises(TaskError, match="syntax error at line 1"):
        load_task(broken)


def test_returned_values_are_checked(tmp_path: Path) -> None:
    path = write_task(
        tmp_path,
        """
        import torch
        def model():
            return torch.nn.Linear(2, 2)
        def data(peer, peers):
            return [1, 2, 3]
        """,
    )
    task = load_task(path)
    with pytest.raises(TaskError, match=r"data\(0, 2\) returned list"):
        task.datasets(0, 2)
    task.module.data = lambda peer, peers: (5, None)
    with pytest.raises(TaskError, match="the training set is int, not a map-style Dataset"):
        task.datasets(0, 2)
    task.module.model = lambda: "a model"
    with pytest.raises(TaskError, match=r"model\(\) returned str"):
        task.build_model(0)
    net = torch.nn.Linear(2, 2)
    task.module.loss = lambda model, batch: model(batch).sum(dim=1)
    with pytest.raises(TaskError, match=r"loss\(\) returned a tensor of shape \[3\]"):
        task.loss(net, torch.ones(3, 2))


def test_settings_reach_the_functions_that_name_them() -> None:
    def data(peer, peers, seed=0, partition="iid", other=5):
        return peer, peers, seed, partition, other

    got = call_with_context(data, (1, 4), {"seed": 7, "partition": "dirichlet:1", "lr": None})
    assert got == (1, 4, 7, "dirichlet:1", 5)
    assert call_with_context(lambda peer, peers: peer + peers, (1, 2), {"seed": 3}) == 3


def test_non_finite_loss_stops_the_peer_before_the_update(tmp_path: Path) -> None:
    path = write_task(
        tmp_path,
        TOY + "\ndef loss(model, batch):\n    return model(batch[0]).sum() * float('nan')\n",
    )
    trainer = Trainer(TrainConfig(task=path, steps=5, batch_size=8), 0, 2)
    before = [p.detach().clone() for p in trainer.weights.params]
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 1"):
        trainer.run(threading.Event(), lambda info: None)
    for old, p in zip(before, trainer.weights.params, strict=True):
        assert torch.equal(old, p)  # the bad step's update was never applied


# -- what is averaged ------------------------------------------------------------------------
def test_flat_weights_take_parameters_and_float_buffers_only() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    net[2].weight.requires_grad_(False)  # frozen: left out
    flat = FlatWeights(net)
    assert "1.running_mean" in flat.names and "1.running_var" in flat.names
    assert "1.num_batches_tracked" not in flat.names and "2.weight" not in flat.names
    expected = 4 * 8 + 8 + 8 + 8 + 8 + 8 + 2  # lin1 w,b; bn w,b; bn mean,var; lin2 b
    assert flat.array.size == expected
    net.train()
    net(torch.randn(16, 4))  # BatchNorm updates its running stats in place: in the vector
    sizes = [t.numel() for t in flat.tensors]
    start = sum(sizes[: flat.names.index("1.running_mean")])
    assert torch.count_nonzero(net[1].running_mean) > 0
    assert np.array_equal(flat.array[start : start + 8], net[1].running_mean.numpy())
    flat.array[:] = 0.0
    assert torch.count_nonzero(net[1].running_var) == 0 and torch.count_nonzero(net[0].weight) == 0


def test_non_float32_and_replaced_tensors_are_refused() -> None:
    with pytest.raises(ModelError, match="0.weight is float64"):
        FlatWeights(nn.Sequential(nn.Linear(2, 2).double()))
    net = nn.Linear(3, 3)
    flat = FlatWeights(net)
    flat.check_bound()
    net.weight = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ModelError, match="weight was replaced"):
        flat.check_bound()


def test_average_states_averages_floats_and_keeps_integers(tmp_path: Path) -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 7.0]), "n": torch.tensor(9)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    avg = average_states([(tmp_path / "a.pt", 1.0), (tmp_path / "b.pt", 3.0)])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 6.0]))
    assert avg["n"].item() == 5 and avg["n"].dtype == torch.int64


# -- batching ----------------------------------------------------------------------------------
class Squares(Dataset):
    """A map-style data set that is not a TensorDataset: the general fetch path."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), float(i * i)]), i % 3


def _take(batches: Batches, n: int) -> list[torch.Tensor]:
    return [next(batches)[0].clone() for _ in range(n)]


def test_general_datasets_batch_like_tensor_datasets() -> None:
    general = Batches(Squares(), 8, seed=3, peer_index=1)
    xs = torch.stack([Squares()[i][0] for i in range(50)])
    tensor = Batches(TensorDataset(xs, torch.arange(50) % 3), 8, seed=3, peer_index=1)
    for a, b in zip(_take(general, 15), _take(tensor, 15), strict=True):
        assert torch.equal(a, b)


# -- checkpoints: the same run, interrupted or not -------------------------------------------
SCHEDULED = (
    TOY
    + """
def optimizer(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)

def scheduler(optimizer, steps=1):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
"""
)


def _train(task: str, steps: int, ckpt: Path | None, stop_at: int | None = None) -> Trainer:
    cfg = TrainConfig(task=task, steps=steps, batch_size=8, clip_grad=1.0)
    trainer = Trainer(cfg, 0, 2)
    if ckpt is not None:
        trainer.enable_checkpoints(CheckpointConfig(str(ckpt), every_steps=0, every_seconds=0))
    stop = threading.Event()

    def on_step(info) -> None:
        if info.step == stop_at:
            stop.set()

    trainer.run(stop, on_step)
    if ckpt is not None:
        trainer.checkpoint_now(wait=True)
        trainer.close()
    return trainer


def test_resume_continues_exactly_with_momentum_scheduler_and_batchnorm(tmp_path: Path) -> None:
    task = write_task(tmp_path, SCHEDULED)
    whole = _train(task, 40, None)
    _train(task, 40, tmp_path / "ckpt", stop_at=17)
    resumed = _train(task, 40, tmp_path / "ckpt")
    assert resumed.resumed_from is not None and resumed.step == 40
    after = resumed.model.state_dict()
    assert list(after) == list(whole.model.state_dict())
    for name, a in whole.model.state_dict().items():
        assert torch.equal(a, after[name]), name  # weights, BatchNorm statistics and its counter


def _train_outer(task: str, ckpt: Path, stop_at: int | None, resume_outer: bool = True) -> Any:
    """40 steps with an outer step every 5 (as a peer with --outer-steps 5 takes them)."""
    cfg = TrainConfig(task=task, steps=40, batch_size=8, clip_grad=1.0)
    trainer = Trainer(cfg, 0, 2)
    trainer.enable_checkpoints(CheckpointConfig(str(ckpt), every_steps=0, every_seconds=0))
    outer = trainer.outer = OuterStore(trainer.weights, OuterConfig(steps=5))
    if resume_outer and trainer.resumed_outer is not None:
        outer.load_state(trainer.resumed_outer)
    stop = threading.Event()

    def on_step(info) -> None:
        if info.step % 5 == 0:
            outer.step()
        if info.step == stop_at:
            stop.set()

    trainer.run(stop, on_step)
    trainer.checkpoint_now(wait=True)
    trainer.close()
    return trainer, outer


def test_resume_continues_the_outer_weights_and_momentum_exactly(tmp_path: Path) -> None:
    task = write_task(tmp_path, SCHEDULED)
    whole, whole_outer = _train_outer(task, tmp_path / "whole", None)
    # Stopped between two outer steps (17: 3 outer steps done, 2 inner steps into the 4th).
    _, cut = _train_outer(task, tmp_path / "cut", 17)
    assert cut.outer_steps == 3
    resumed, outer = _train_outer(task, tmp_path / "cut", None)
    assert resumed.step == 40 and outer.outer_steps == 8
    np.testing.assert_array_equal(outer.array, whole_outer.array)
    np.testing.assert_array_equal(outer.momentum, whole_outer.momentum)
    for name, a in whole.model.state_dict().items():
        assert torch.equal(a, resumed.model.state_dict()[name]), name
    # Without the saved outer state (outer weights from the live ones, no momentum), the
    # same resume ends elsewhere: the state is what carries the run across the restart.
    _train_outer(task, tmp_path / "cut2", 17)
    _, lost = _train_outer(task, tmp_path / "cut2", None, resume_outer=False)
    assert not np.array_equal(lost.array, whole_outer.array)


def test_checkpoint_of_another_task_is_refused(tmp_path: Path) -> None:
    task = write_task(tmp_path, SCHEDULED)
    _train(task, 5, tmp_path / "ckpt")
    files = sorted((tmp_path / "ckpt").iterdir())
    other = Trainer(TrainConfig(steps=5), 0, 2)  # the built-in classifier
    refused = "was written for task 'task', this peer runs task 'classifier'"
    with pytest.raises(Exception, match=refused):
        other.enable_checkpoints(CheckpointConfig(str(tmp_path / "ckpt")))
    assert sorted((tmp_path / "ckpt").iterdir()) == files  # nothing renamed or overwritten


# -- the robustness report reads the task's headline metric ---------------------------------
def test_report_compares_a_loss_headline_the_right_way_round() -> None:
    from trainer.chaos.report import quality

    def peer(name: str, loss: float, restarts: int = 0) -> dict:
        return {"name": name, "status": "finished", "restarts": restarts,
                "metrics": {"val_loss": loss, "other": 1.0}}  # fmt: skip

    run = {"peers": [peer("a", 2.0), peer("b", 2.2), peer("c", 2.5, restarts=1)],
           "consensus_metrics": {"val_loss": 2.1}}  # fmt: skip
    base = {"peers": [peer("a", 1.9), peer("b", 2.0), peer("c", 2.0)],
            "consensus_metrics": {"val_loss": 1.95}}  # fmt: skip
    q = quality(run, base)
    assert q["metric"] == "val_loss" and q["unit"] == ""
    by = {p["name"]: p for p in q["peers"]}
    assert by["a"]["delta"] == pytest.approx(0.1) and by["a"]["behind_unrestarted"] is None
    # c ends 0.4 above the mean loss of the unrestarted peers (2.1): 0.4 worse.
    assert by["c"]["behind_unrestarted"] == pytest.approx(0.4)
    assert q["consensus_delta"] == pytest.approx(0.15)
    acc = quality({"peers": [{"name": "a", "test_accuracy": 0.9, "restarts": 1}]}, None)
    assert acc["metric"] == "accuracy" and acc["unit"] == "pp"
