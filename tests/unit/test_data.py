"""IDX reading, data set loading and the resumable batch iterator."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data

from trainer.data import (
    DEFAULT_ASSET,
    BatchIterator,
    DataError,
    Dataset,
    load_dataset,
    read_idx,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
ASSETS = Path(__file__).parents[2] / "trainer" / "assets"


def _shared(sub: str) -> Path:
    """The shared data folder; missing data fails under CI and skips only on a dev machine."""
    return shared_data(sub)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    torch.set_num_threads(1)
    return load_dataset("mnist", _shared("mnist").parent)


def idx_bytes(arr: np.ndarray, type_byte: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_byte]
    head = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dtype).tobytes()


def write_mnist_like(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = False) -> None:
    """Write four tiny IDX files with MNIST's names into folder."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{split}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{split}-labels-idx1-ubyte": (np.arange(n) % 10).astype(np.uint8),
        }
        for name, arr in files.items():
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)


# --------------------------------------------------------------------------- read_idx


def test_read_idx_real_mnist_shapes_and_label_counts() -> None:
    folder = _shared("mnist")
    x = read_idx(folder / "train-images-idx3-ubyte.gz")  # stored as three .partN pieces
    y = read_idx(folder / "train-labels-idx1-ubyte.gz")
    yt = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(yt, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert x.mean() == pytest.approx(33.318, abs=1e-3)  # from the shared README
    # The MD5 of the joined, gunzipped file is the published one, so the bytes are exact.
    assert x.flags.writeable


def test_read_idx_real_fashion_split_test_images() -> None:
    x = read_idx(_shared("fashion-mnist") / "t10k-images-idx3-ubyte.gz")
    assert x.shape == (10000, 28, 28)
    assert x.mean() == pytest.approx(73.147, abs=1e-3)


def test_read_idx_plain_gz_and_wide_types(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a").write_bytes(idx_bytes(arr, 0x0C))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr, 0x0C)))
    floats = np.linspace(-1, 1, 7, dtype=np.float32)
    (tmp_path / "f").write_bytes(idx_bytes(floats, 0x0D))
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.int32 and got.dtype.isnative
        np.testing.assert_array_equal(got, arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), floats)


def test_read_idx_joins_parts_in_numeric_order(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    blob = gzip.compress(idx_bytes(arr))
    # 12 pieces, so lexical order (part0, part1, part10, part11, part2, ...) would be wrong.
    cuts = np.linspace(0, len(blob), 13).astype(int)
    for i in range(12):
        (tmp_path / f"x.gz.part{i}").write_bytes(blob[cuts[i] : cuts[i + 1]])
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "x.gz.part7").unlink()
    with pytest.raises(DataError, match=r"x\.gz: split file is missing part 7"):
        read_idx(tmp_path / "x.gz")


def _bad_file(tmp_path: Path, blob: bytes, name: str = "bad") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


GOOD = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00\x00\x07\x03" + GOOD[4:], r"bad IDX magic 0x00000703"),
        (b"\x01\x02\x08\x03" + GOOD[4:], r"bad IDX magic 0x01020803"),
        (b"\x00\x00\x08\x05" + b"\x00" * 40, r"5 dimensions"),
        (b"\x00\x00", r"truncated IDX header: 2 of 4 bytes"),
        (GOOD[:12], r"truncated IDX header"),
        (GOOD[:-1], r"truncated IDX data for dims \(3, 28, 28\): 2351 of 2352 bytes"),
        (GOOD + b"\x00", r"more bytes than IDX dims \(3, 28, 28\) declare"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 65536, 65536), r"limit 2147483648"),
        (gzip.compress(GOOD)[:-30], r"gzip stream is truncated"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path: Path, blob: bytes, message: str) -> None:
    path = _bad_file(tmp_path, blob)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert "\n" not in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    blob = bytearray(gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8) % 7)))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(DataError, match=r"bad: gzip data is corrupt"):
        read_idx(_bad_file(tmp_path, bytes(blob)))
    crc = bytearray(gzip.compress(GOOD))
    crc[-8] ^= 0x01  # the CRC32 in the trailer: data decodes, the check must still fail
    with pytest.raises(DataError, match=r"gzip data is corrupt.*CRC"):
        read_idx(_bad_file(tmp_path, bytes(crc)))


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.gz: no such file \(nor nope\.gz\.part0"):
        read_idx(tmp_path / "nope.gz")


# --------------------------------------------------------------------------- load_dataset


def test_load_mnist_from_shared_folder(mnist: Dataset) -> None:
    assert mnist.name == "mnist" and mnist.num_classes == 10 and mnist.input_shape == (1, 28, 28)
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.float32
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.dtype == torch.int64
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    # Normalized with MNIST's published mean/std, so train statistics are ~0 and ~1.
    assert abs(float(mnist.x_train.mean())) < 1e-3
    assert float(mnist.x_train.std()) == pytest.approx(1.0, abs=1e-2)


def test_load_fashion_mnist_direct_folder() -> None:
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist", _shared("fashion-mnist"))
    assert data.x_train.shape == (60000, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(float(data.x_train.mean())) < 1e-3


def test_load_torchvision_layout_and_gz(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "MNIST" / "raw")
    data = load_dataset("mnist", tmp_path)
    assert data.x_train.shape == (6, 1, 28, 28) and data.y_test.tolist() == [0, 1, 2, 3]
    write_mnist_like(tmp_path / "gz", gz=True)
    assert load_dataset("mnist", tmp_path / "gz").x_test.shape == (4, 1, 28, 28)


def test_load_dataset_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data dir {re.escape(str(tmp_path))}/absent: no such"):
        load_dataset("mnist", tmp_path / "absent")
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\(\.gz\) found.*MNIST IDX"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match=r"needs a data dir"):
        load_dataset("mnist", None)
    with pytest.raises(DataError, match=r"'cifar': unknown \(choose from default, mnist"):
        load_dataset("cifar", tmp_path)


def test_load_dataset_missing_one_file(tmp_path: Path) -> None:
    write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte\(\.gz\) found"):
        load_dataset("mnist", tmp_path)


def test_load_dataset_count_mismatch_and_label_range(tmp_path: Path) -> None:
    write_mnist_like(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"\(train\): 6 images but 5 labels"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8)))
    with pytest.raises(DataError, match=r"\(train\): labels span 0\.\.10, expected 0\.\.9"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 28, 27), np.uint8)))
    labels.write_bytes(idx_bytes(np.arange(6, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"\(test\): images are uint8 \(4, 28, 27\)"):
        load_dataset("mnist", tmp_path)


def test_default_dataset_loads_offline() -> None:
    data = load_dataset("default", None)
    assert data.name == "default"
    assert data.x_train.shape == (12000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert data.y_train.shape == (12000,) and data.y_test.shape == (2000,)
    assert torch.bincount(data.y_train, minlength=10).min() > 1000
    assert abs(float(data.x_train.mean())) < 0.05


def test_default_asset_matches_readme_and_mnist_prefix() -> None:
    asset = ASSETS / DEFAULT_ASSET
    assert asset.stat().st_size < 3_000_000
    sha = hashlib.sha256(asset.read_bytes()).hexdigest()
    assert sha in (ASSETS / "README.md").read_text()
    with np.load(asset, allow_pickle=False) as npz:
        y = npz["y_train"]
    full = read_idx(_shared("mnist") / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(y, full[:12000])


def test_default_asset_corrupt_is_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "trainer"
    (fake / "assets").mkdir(parents=True)
    (fake / "assets" / DEFAULT_ASSET).write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.setattr("trainer.idx.resources.files", lambda _pkg: fake)
    with pytest.raises(DataError, match=r"default data set .*mnist-small\.npz: cannot read"):
        load_dataset("default")


# --------------------------------------------------------------------------- BatchIterator


def _toy(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return x, torch.arange(n)


def test_batch_iterator_epoch_covers_partition_once() -> None:
    x, y = _toy()
    shard = np.array([3, 5, 8, 13, 21, 34, 55, 89, 90, 91, 92])
    it = BatchIterator(x, y, shard, batch_size=4, seed=7, peer_index=2)
    assert it.batches_per_epoch == 3
    seen = [next(it) for _ in range(3)]
    assert [len(b[1]) for b in seen] == [4, 4, 3]
    labels = torch.cat([b[1] for b in seen])
    assert sorted(labels.tolist()) == shard.tolist()
    for xb, yb in seen:  # images travel with their labels
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)
    assert it.epoch == 0 and it.position == 11
    next(it)
    assert it.epoch == 1 and it.position == 4


def test_batch_iterator_deterministic_per_seed_peer_epoch() -> None:
    x, y = _toy()
    idx = np.arange(100)

    def order(seed: int, peer: int, epochs: int = 2) -> list[int]:
        it = BatchIterator(x, y, idx, batch_size=100, seed=seed, peer_index=peer)
        return [v for _ in range(epochs) for v in next(it)[1].tolist()]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    first = order(1, 0)
    assert first[:100] != first[100:]  # each epoch has its own order


def test_batch_iterator_resume_gives_same_batches() -> None:
    x, y = _toy()
    shard = np.arange(0, 100, 3)
    it = BatchIterator(x, y, shard, batch_size=5, seed=3, peer_index=1)
    for _ in range(9):  # into the second epoch (7 batches per epoch)
        next(it)
    buf = io.BytesIO()
    torch.save(it.state_dict(), buf)  # a checkpoint holds it and reloads with weights_only
    expected = [next(it)[1].tolist() for _ in range(12)]

    buf.seek(0)
    fresh = BatchIterator(x, y, shard, batch_size=5, seed=3, peer_index=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert (fresh.epoch, fresh.position) == (1, 10)
    assert [next(fresh)[1].tolist() for _ in range(12)] == expected


def test_batch_iterator_rejects_mismatched_state_and_bad_input() -> None:
    x, y = _toy()
    state = BatchIterator(x, y, np.arange(10), batch_size=2, seed=1).state_dict()
    other = BatchIterator(x, y, np.arange(10), batch_size=2, seed=2)
    with pytest.raises(ValueError, match=r"data cursor is for"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"out of range"):
        BatchIterator(x, y, np.arange(10), 2, seed=1).load_state_dict({**state, "position": 11})
    with pytest.raises(ValueError, match=r"non-empty"):
        BatchIterator(x, y, np.array([], dtype=np.int64), batch_size=2, seed=1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\)"):
        BatchIterator(x, y, np.array([5, 100]), batch_size=2, seed=1)
