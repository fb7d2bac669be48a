"""Checkpoints: round trip, rotation, corruption, full or unwritable disks, background writes."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer import checkpoint as ck
from trainer.checkpoint import (
    BackgroundCheckpointer,
    CheckpointError,
    CheckpointStore,
    build_checkpoint,
    capture_rng,
    is_checkpoint_file,
    load_any,
    load_checkpoint,
    model_state,
    restore_rng,
    restore_training_state,
    save_atomic,
    snapshot_model_optimizer,
    validate_compatible,
    validate_model,
)

REPO = Path(__file__).resolve().parents[1]
WRITER = REPO / "tests" / "helpers_ckpt_writer.py"

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.3)  # makes the torch RNG part of the step
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


DATA_X = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
DATA_Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """A step whose batch depends on numpy, its scale on python random, dropout on torch."""
    idx = torch.from_numpy(np.random.randint(0, 64, size=8))
    scale = 0.5 + random.random()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(DATA_X[idx]), DATA_Y[idx]) * scale
    loss.backward()
    opt.step()


def small_state(step: int, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": {"w": torch.full((4,), float(step))},
        "optimizer": {},
        "step": step,
        "config": {"model": "mlp"},
    }
    fields.update(over)
    return build_checkpoint(**fields)


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------- round trip


def test_resume_gives_bit_identical_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5):
        train_step(model, opt)
    store = CheckpointStore(tmp_path)
    weights, optim = snapshot_model_optimizer(model, opt)
    store.save(build_checkpoint(model=weights, optimizer=optim, step=5, data={"cursor": 40}))
    for _ in range(5):
        train_step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process would start from other weights and other RNG states.
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    resumed = TinyNet()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.01)
    found = store.latest()
    assert found is not None
    ckpt, path = found
    assert path.name == "ckpt-000000005.pt"
    assert ckpt["step"] == 5 and ckpt["data"] == {"cursor": 40}
    restore_training_state(ckpt, resumed, resumed_opt)
    restore_rng(ckpt["rng"])
    for _ in range(5):
        train_step(resumed, resumed_opt)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_checkpoint_loads_with_weights_only_and_keeps_fields(tmp_path: Path) -> None:
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    train_step(model, opt)
    weights, optim = snapshot_model_optimizer(model, opt)
    ckpt = build_checkpoint(
        model=weights,
        optimizer=optim,
        step=123,
        data={"epoch": 2, "cursor": 17, "order_seed": 5},
        config={"model": "tiny", "dataset": "mnist", "peer_index": 3},
        peers=["127.0.0.1:7001", "127.0.0.1:7002"],
        incarnation=4,
    )
    path = CheckpointStore(tmp_path).save(ckpt)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1
    assert raw["step"] == 123 and raw["incarnation"] == 4
    assert raw["peers"] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert raw["config"] == {"model": "tiny", "dataset": "mnist", "peer_index": 3}
    assert isinstance(raw["time"], float)
    assert set(raw["rng"]) >= {"torch", "numpy", "python"}
    assert torch.equal(raw["optimizer"]["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])


def test_rng_capture_restore_replays_all_three() -> None:
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    # Leave numpy with a cached gaussian, a part of its state that is easy to lose.
    np.random.standard_normal()
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_restore_rng_rejects_malformed_state() -> None:
    with pytest.raises(CheckpointError, match="rng state"):
        restore_rng({"torch": torch.get_rng_state()})


def test_snapshot_is_independent_of_later_training() -> None:
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    train_step(model, opt)
    weights, optim = snapshot_model_optimizer(model, opt)
    before_w = {k: v.clone() for k, v in weights.items()}
    before_m = optim["state"][0]["exp_avg"].clone()
    train_step(model, opt)
    assert all(torch.equal(weights[k], before_w[k]) for k in weights)
    assert torch.equal(optim["state"][0]["exp_avg"], before_m)
    assert not torch.equal(opt.state_dict()["state"][0]["exp_avg"], before_m)


# ---------------------------------------------------------------- rotation and corruption


def test_keep_k_prunes_oldest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for step in range(0, 100, 10):
        store.save(small_state(step))
    assert names(store.list()) == ["ckpt-000000070.pt", "ckpt-000000080.pt", "ckpt-000000090.pt"]
    found = store.latest()
    assert found is not None and found[0]["step"] == 90


def test_list_orders_by_step_beyond_nine_digits(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(small_state(999_999_999))
    store.save(small_state(1_000_000_000))
    assert [ck._step_of(p) for p in store.list()] == [999_999_999, 1_000_000_000]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(random.Random(3).randbytes(size))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_tail(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-30:] = bytes(30)  # zeroes the zip end-of-directory record
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty, _flip_tail])
def test_corrupt_newest_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 20, 30):
        store.save(small_state(step))
    damage(store.path_for(30))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        found = store.latest()
    assert found is not None
    ckpt, path = found
    assert path.name == "ckpt-000000020.pt" and ckpt["step"] == 20
    assert torch.equal(ckpt["model"]["w"], torch.full((4,), 20.0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ckpt-000000030.pt" in warnings[0].getMessage()


def test_all_corrupt_gives_none_and_a_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for step in (1, 2):
        store.save(small_state(step))
        _truncate(store.path_for(step))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert store.latest() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "ckpt-000000002.pt" in messages[0] and "ckpt-000000001.pt" in messages[1]


def test_empty_store_has_no_latest(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").latest() is None
    assert (tmp_path / "new").is_dir()


def test_temp_files_are_ignored_then_cleaned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(small_state(5))
    leftover = tmp_path / ".ckpt-000000009.pt.k2j4h1x0.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        found = store.latest()
    assert found is not None and found[0]["step"] == 5
    assert caplog.records == []
    assert names(store.list()) == ["ckpt-000000005.pt"]
    assert not is_checkpoint_file(leftover)
    CheckpointStore(tmp_path)
    assert not leftover.exists()
    assert other.exists()


def test_is_checkpoint_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert is_checkpoint_file(store.save(small_state(3)))
    (tmp_path / "ckpt-000000004.pt").mkdir()
    assert not is_checkpoint_file(tmp_path / "ckpt-000000004.pt")
    assert not is_checkpoint_file(tmp_path / "ckpt-7.pt")
    assert not is_checkpoint_file(tmp_path / "ckpt-000000099.pt")


# ---------------------------------------------------------------- disk failures


def test_store_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker / "ckpts"
    with pytest.raises(CheckpointError, match="checkpoint dir .*blocker/ckpts: "):
        CheckpointStore(target)
    with pytest.raises(CheckpointError, match=r"blocker: not a directory"):
        CheckpointStore(blocker)
    assert blocker.read_text() == "a file, not a folder"


def test_store_on_unwritable_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which chmod does not stop; access() is what the check relies on.
    monkeypatch.setattr(ck.os, "access", lambda *a, **k: False)
    with pytest.raises(CheckpointError, match=r"not writable \(Permission denied\)"):
        CheckpointStore(tmp_path)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_disk_full_raises_and_keeps_existing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.save(small_state(10))
    store.save(small_state(20))
    before = file_bytes(tmp_path)
    monkeypatch.setattr(ck.os, failing, enospc)
    # Step 20 again: the good file of the same name must survive a failed rewrite.
    for step in (20, 30):
        with pytest.raises(CheckpointError) as info:
            store.save(small_state(step, model={"w": torch.zeros(100_000)}))
        assert str(info.value).startswith(f"checkpoint dir {tmp_path}: no space left")
    monkeypatch.undo()
    assert file_bytes(tmp_path) == before
    found = store.latest()
    assert found is not None and found[0]["step"] == 20


def test_permission_denied_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ck.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError) as info:
        save_atomic({"x": 1}, tmp_path / "a.pt")
    assert str(info.value) == f"checkpoint dir {tmp_path}: not writable (Permission denied)"


def test_failed_rename_removes_temp_and_keeps_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.pt"
    save_atomic({"w": torch.ones(3)}, target)
    before = file_bytes(tmp_path)
    monkeypatch.setattr(ck.os, "replace", enospc)
    with pytest.raises(CheckpointError, match="no space left"):
        save_atomic({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert file_bytes(tmp_path) == before


def test_save_refuses_objects_weights_only_cannot_load(tmp_path: Path) -> None:
    state = small_state(1, data={"order": np.arange(4)})
    with pytest.raises(CheckpointError, match=r"\['data'\]\['order'\]: numpy.ndarray"):
        CheckpointStore(tmp_path).save(state)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_incomplete_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="missing keys rng, config"):
        store.save({"format": 1, "model": {}, "optimizer": {}, "step": 1, "data": {}})
    bad = small_state(1)
    bad["step"] = "1"
    with pytest.raises(CheckpointError, match="'step' must be int, got str"):
        store.save(bad)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- loading other files


class NotAllowed:
    pass


def test_load_any_reads_checkpoints_and_plain_state_dicts(tmp_path: Path) -> None:
    model = TinyNet()
    final = tmp_path / "final.pt"
    save_atomic(model.state_dict(), final)
    plain = load_any(final)
    assert set(plain) == set(model.state_dict())
    path = CheckpointStore(tmp_path / "c").save(small_state(8))
    full = load_any(path)
    assert full["step"] == 8
    assert torch.equal(model_state(full)["w"], torch.full((4,), 8.0))
    assert model_state(plain).keys() == model.state_dict().keys()


def test_load_refuses_code_and_junk(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"obj": NotAllowed()}, evil)  # a pickle global: weights_only must refuse it
    with pytest.raises(CheckpointError, match=f"checkpoint {evil}: corrupt or truncated"):
        load_any(evil)
    odd = tmp_path / "odd.pt"
    save_atomic({"w": [1, 2]}, odd)
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a model state_dict"):
        load_any(odd)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(odd)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_any(tmp_path / "missing.pt")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    state = small_state(1)
    state["format"] = 2
    path = tmp_path / "future.pt"
    save_atomic(state, path)
    with pytest.raises(CheckpointError, match="format 2, this build reads format 1"):
        load_checkpoint(path)


# ---------------------------------------------------------------- compatibility


def test_validate_compatible_names_key_and_both_values() -> None:
    with pytest.raises(CheckpointError) as info:
        validate_compatible(
            {"model": "cnn", "dataset": "mnist"},
            {"model": "mlp", "dataset": "mnist"},
            source="checkpoint ckpt-000000100.pt",
        )
    assert str(info.value) == (
        "checkpoint ckpt-000000100.pt was written for model 'cnn', this peer runs model 'mlp'"
    )


def test_validate_compatible_lists_every_mismatch() -> None:
    with pytest.raises(CheckpointError) as info:
        validate_compatible(
            {"model": "mlp", "seed": 1, "peer_index": 2},
            {"model": "mlp", "seed": 2, "dataset": "fashion"},
        )
    assert str(info.value) == (
        "checkpoint was written for dataset <missing> and seed 1 and peer_index 2, "
        "this peer runs dataset 'fashion' and seed 2 and peer_index <missing>"
    )


def test_validate_compatible_accepts_equal_and_custom_keys() -> None:
    validate_compatible({"model": "mlp", "lr": 0.1}, {"model": "mlp", "lr": 0.2})
    with pytest.raises(CheckpointError, match="lr 0.1"):
        validate_compatible({"lr": 0.1}, {"lr": 0.2}, keys=("lr",))


def test_validate_model_names_first_mismatching_tensor() -> None:
    model = TinyNet()
    good = model.state_dict()
    validate_model(good, model)
    wide = dict(good, **{"fc1.weight": torch.zeros(16, 6)})
    with pytest.raises(CheckpointError, match=r"'fc1.weight' has shape \(16, 6\), .*\(8, 6\)"):
        validate_model(wide, model)
    missing = {k: v for k, v in good.items() if k != "fc2.bias"}
    with pytest.raises(CheckpointError, match="'fc2.bias' missing"):
        validate_model(missing, model)
    extra = dict(good, **{"fc3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'fc3.weight' is not in the model"):
        validate_model(extra, model)
    double = dict(good, **{"fc2.bias": good["fc2.bias"].double()})
    with pytest.raises(CheckpointError, match="'fc2.bias' has dtype torch.float64"):
        validate_model(double, model)


def test_restore_with_wrong_model_leaves_model_untouched() -> None:
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = build_checkpoint(model=other.state_dict(), optimizer={}, step=1)
    with pytest.raises(CheckpointError, match="checkpoint: tensor 'fc1.weight' missing"):
        restore_training_state(ckpt, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- background writer


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Holds every save_atomic until released; `entered` is set once a write has begun."""
    entered, release = threading.Event(), threading.Event()
    real = ck.save_atomic

    def held(obj: Any, path: Any) -> None:
        entered.set()
        assert release.wait(10.0), "gate never released"
        real(obj, path)

    monkeypatch.setattr(ck, "save_atomic", held)
    yield entered, release
    release.set()


def test_background_writes_and_flushes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    with BackgroundCheckpointer(store) as writer:
        writer.submit(small_state(1))
        assert writer.flush(10.0)
        assert writer.written == 1 and writer.last_error is None
        assert writer.last_path == store.path_for(1)
    found = store.latest()
    assert found is not None and found[0]["step"] == 1


def test_newer_submit_replaces_pending_one(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    store = CheckpointStore(tmp_path, keep=10)
    writer = BackgroundCheckpointer(store)
    writer.submit(small_state(1))
    assert entered.wait(10.0)
    for step in (2, 3, 4):
        writer.submit(small_state(step))
    release.set()
    assert writer.close(10.0)
    assert (writer.written, writer.replaced) == (2, 2)
    assert names(store.list()) == ["ckpt-000000001.pt", "ckpt-000000004.pt"]


def test_close_is_bounded_and_final(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    store = CheckpointStore(tmp_path)
    writer = BackgroundCheckpointer(store)
    writer.submit(small_state(1))
    assert entered.wait(10.0)
    writer.submit(small_state(2))
    assert writer.flush(0.05) is False
    assert writer.close(0.05) is False  # step 1 still in flight, step 2 dropped
    with pytest.raises(CheckpointError, match="writer is closed"):
        writer.submit(small_state(3))
    release.set()
    writer._thread.join(10.0)
    assert not writer._thread.is_alive()
    assert names(store.list()) == ["ckpt-000000001.pt"]
    assert writer.close(1.0) is True  # idempotent


def test_background_errors_logged_once_and_exposed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    writer = BackgroundCheckpointer(store)
    monkeypatch.setattr(ck.os, "write", enospc)
    with caplog.at_level(logging.ERROR, logger="trainer.checkpoint"):
        for step in (1, 2, 3):
            writer.submit(small_state(step))
            assert writer.flush(10.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no space left" in errors[0].getMessage()
    assert isinstance(writer.last_error, CheckpointError)
    assert writer.failed == 3 and writer.written == 0
    monkeypatch.undo()
    writer.submit(small_state(4))
    assert writer.close(10.0)
    assert writer.last_error is None and writer.written == 1
    assert names(store.list()) == ["ckpt-000000004.pt"]


def test_submit_checks_state_in_the_caller(tmp_path: Path) -> None:
    writer = BackgroundCheckpointer(CheckpointStore(tmp_path))
    with pytest.raises(CheckpointError, match="missing keys"):
        writer.submit({"step": 1})
    assert writer.close(5.0)
