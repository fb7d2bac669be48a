"""The built-in shakespeare task: packaged text, windows, peers' shares, model and training."""

from __future__ import annotations

import gzip
import hashlib
import math
from importlib import resources

import numpy as np
import pytest
import torch
from conftest import shared_data
from torch.utils.data import default_collate

from trainer.task import load_task
from trainer.tasks import shakespeare as sk

TEXT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # char-rnn's
N_CHARS = 1_115_394


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def packaged_bytes() -> bytes:
    return gzip.decompress(resources.files("trainer").joinpath(sk.ASSET).read_bytes())


def seeded_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sk.model()


def batch_of(ds: torch.utils.data.Dataset, indices: range | list[int]) -> tuple:
    return default_collate([ds[i] for i in indices])


def test_packaged_text_is_tiny_shakespeare() -> None:
    raw = packaged_bytes()
    assert len(raw) == N_CHARS and hashlib.sha256(raw).hexdigest() == TEXT_SHA256
    assert sk.CHARS == "".join(sorted(set(raw.decode("ascii")))) and sk.VOCAB_SIZE == 65
    assert sk.decode(sk.encode("First Citizen:\n")) == "First Citizen:\n"


def test_packaged_text_equals_the_shared_copy() -> None:
    folder = shared_data("tinyshakespeare")
    shared = (folder / "input.txt").read_bytes()
    assert hashlib.sha256(packaged_bytes()).digest() == hashlib.sha256(shared).digest()
    # Reading it through data_dir gives the same windows as the packaged asset.
    train, evaluation = sk.data(0, 1, data_dir=str(folder))
    packaged_train, packaged_eval = sk.data(0, 1)
    assert torch.equal(train[1234][0], packaged_train[1234][0])
    assert torch.equal(evaluation[479][1], packaged_eval[479][1])


def test_missing_data_dir_is_one_line_naming_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match=rf"shakespeare: {tmp_path / 'input.txt'} not found"):
        sk.data(0, 1, data_dir=str(tmp_path))


def test_foreign_characters_are_refused(tmp_path) -> None:
    (tmp_path / "input.txt").write_text("To be, or not to be ~ that is the question.\n" * 100)
    with pytest.raises(ValueError, match=r"'~' at byte 20 is not in the vocabulary"):
        sk.data(0, 1, data_dir=str(tmp_path))


def test_model_size_shape_and_no_buffers() -> None:
    net = seeded_model()
    n_params = sum(p.numel() for p in net.parameters())
    assert 750_000 <= n_params <= 850_000
    assert list(net.buffers()) == []  # averaging the parameters averages the whole model
    assert net.head.weight is net.wte.weight  # tied
    logits = net(torch.randint(0, sk.VOCAB_SIZE, (3, sk.BLOCK_SIZE)))
    assert logits.shape == (3, 64, 65) and logits.dtype == torch.float32


def test_peers_split_every_training_window_and_share_the_evaluation_set() -> None:
    (train0, eval0), (train1, eval1) = sk.data(0, 2, seed=3), sk.data(1, 2, seed=3)
    windows = len(train0.dataset)
    assert windows == int(N_CHARS * 0.9) - 64
    a, b = set(train0.indices), set(train1.indices)
    assert not a & b and a | b == set(range(windows))
    assert abs(len(a) - len(b)) <= 1

    assert len(eval0) == len(eval1) == 480
    assert np.array_equal(eval0.starts, eval1.starts)
    text = eval0.text  # the validation split: the last 10% of the characters
    assert len(text) == N_CHARS - int(N_CHARS * 0.9)
    assert eval0.starts[0] == 0 and eval0.starts[-1] + 65 == len(text)

    for ds in (train0, eval1):
        x, y = ds[len(ds) - 1]
        assert x.shape == y.shape == (64,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[1:], y[:-1])
    x, y = eval0[0]
    assert torch.equal(x, torch.from_numpy(text[:64].astype(np.int64)))
    assert int(y[-1]) == int(text[64])
    first = int(train1.indices[0])
    assert sk.decode(train1[0][0]) == packaged_bytes()[first : first + 64].decode()


def test_only_iid_partitions() -> None:
    with pytest.raises(ValueError, match=r"shakespeare: partition must be iid"):
        sk.data(0, 2, partition="dirichlet:0.5")


def test_untrained_loss_is_uniform_guessing() -> None:
    train, _ = sk.data(0, 1)
    value = sk.loss(seeded_model(), batch_of(train, range(0, 12_000, 1000))).item()
    assert abs(value - math.log(65)) < 0.3


def test_adamw_steps_fit_one_batch() -> None:
    train, _ = sk.data(0, 1)
    batch = batch_of(train, range(5, 500_000, 41_700))  # 12 windows from across the text
    net = seeded_model()
    opt = sk.optimizer(list(net.parameters()))  # lr 1e-3
    decays = {p.dim() >= 2: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {True: 0.1, False: 0.0}
    first = sk.loss(net, batch).item()
    for _ in range(30):
        opt.zero_grad()
        sk.loss(net, batch).backward()
        opt.step()
    # About 4.19 -> 2.0 (the unigram plateau is about 3.3), whatever the batch.
    assert sk.loss(net, batch).item() < first - 1.5


def test_metrics_weight_every_token_equally() -> None:
    _, evaluation = sk.data(0, 1)
    net = seeded_model().eval()
    with torch.inference_mode():
        uneven = sk.metrics(net, [batch_of(evaluation, range(0, 80)), batch_of(evaluation, [80])])
        whole = sk.loss(net, batch_of(evaluation, range(81))).item()
    assert list(uneven) == ["val_loss"]
    assert uneven["val_loss"] == pytest.approx(whole, rel=1e-5)


def test_loads_as_the_builtin_task() -> None:
    task = load_task("shakespeare")
    assert task.module is sk
    assert task.defaults == {"batch_size": 12, "lr": 1e-3, "steps": 2000, "clip_grad": 1.0}
