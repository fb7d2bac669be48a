"""Data sets for the trainer: IDX readers, the shipped default set, and a resumable batcher.

Everything is held in memory as tensors: MNIST-sized data is 188 MB as float32, and indexing
in-memory tensors is far cheaper than a DataLoader with per-sample Python on a loaded laptop.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

DATASETS = ("default", "mnist", "fashion-mnist")

# The shipped subset of MNIST; scripts/make_default_dataset.py writes it.
DEFAULT_ASSET = "mnist-small.npz"

# Refuse any IDX file with more elements than this before allocating anything.
MAX_IDX_ELEMENTS = 2**31

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_PART_RE = re.compile(r"\.part(\d+)$")


class DataError(Exception):
    """A data file or folder is missing or malformed; str() is a one-line message for users."""


@dataclass(frozen=True)
class _Spec:
    """What a named image data set looks like on disk and how to normalize it."""

    folders: tuple[str, ...]  # sub-folders of data_dir to try, after data_dir itself
    mean: float  # training-set pixel mean on the [0, 1] scale
    std: float  # training-set pixel std on the [0, 1] scale
    num_classes: int  # labels are 0..num_classes-1


_MNIST = _Spec(("mnist", "MNIST/raw"), 0.1307, 0.3081, 10)
_SPECS: dict[str, _Spec] = {
    "default": _MNIST,
    "mnist": _MNIST,
    "fashion-mnist": _Spec(("fashion-mnist", "FashionMNIST/raw"), 0.2860, 0.3530, 10),
}

_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set held in memory, already normalized."""

    name: str  # one of DATASETS
    x_train: torch.Tensor  # float32, N x 1 x 28 x 28, normalized with the set's mean/std
    y_train: torch.Tensor  # int64, N, values in [0, num_classes)
    x_test: torch.Tensor  # float32, M x 1 x 28 x 28, same normalization as x_train
    y_test: torch.Tensor  # int64, M
    num_classes: int  # number of label values
    input_shape: tuple[int, ...]  # shape of one sample, (1, 28, 28)


# --------------------------------------------------------------------------- IDX reading


def _part_files(path: Path) -> list[Path]:
    """The `path.partN` pieces sorted by N as an integer; they must be numbered 0..K-1."""
    found: dict[int, Path] = {}
    if not path.parent.is_dir():
        return []
    for p in path.parent.iterdir():
        m = _PART_RE.search(p.name)
        if m and p.name[: m.start()] == path.name:
            found[int(m.group(1))] = p
    missing = sorted(set(range(len(found))) - set(found))
    if missing:
        raise DataError(f"{path}: split file is missing part {missing[0]} (have {sorted(found)})")
    return [found[i] for i in range(len(found))]


def _open_raw(path: Path) -> BinaryIO:
    """Open a plain file, or join its `.partN` pieces in memory (they are at most a few MB)."""
    if path.is_file():
        return open(path, "rb")
    parts = _part_files(path)
    if not parts:
        raise DataError(f"{path}: no such file (nor {path.name}.part0, .part1, ...)")
    return io.BytesIO(b"".join(p.read_bytes() for p in parts))


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str) -> bytearray:
    """Read exactly n bytes into a fresh buffer, or raise DataError naming what was short."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise DataError(f"{path}: truncated {what}: {got} of {n} bytes")
        got += k
    return buf


def _read_header(stream: BinaryIO, path: Path) -> tuple[np.dtype[Any], tuple[int, ...]]:
    magic = bytes(_read_exact(stream, 4, path, "IDX header"))
    if magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: bad IDX magic 0x{magic.hex()} (expected e.g. 0x00000803)")
    ndim = magic[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header says {ndim} dimensions (expected 1 to 4)")
    dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, path, "IDX header"))
    return _IDX_DTYPES[magic[2]], tuple(dims)


def _read_idx_stream(stream: BinaryIO, path: Path) -> np.ndarray:
    dtype, dims = _read_header(stream, path)
    count = int(np.prod(dims, dtype=np.int64))
    if count > MAX_IDX_ELEMENTS:
        raise DataError(f"{path}: IDX dims {dims} hold {count} elements (limit {MAX_IDX_ELEMENTS})")
    data = _read_exact(stream, count * dtype.itemsize, path, f"IDX data for dims {dims}")
    # Reading past the end also makes gzip verify its CRC and length trailer.
    if stream.read(1):
        raise DataError(f"{path}: more bytes than IDX dims {dims} declare")
    return (
        np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file: plain, gzip (`.gz`) or split into `.gz.part0..N` pieces.

    `path` names the file as if it were whole (e.g. `train-images-idx3-ubyte.gz`); when it
    does not exist, its `.partN` pieces are joined in numeric order. Gzip is detected by its
    magic bytes. The array is writable and in native byte order.
    """
    path = Path(path)
    try:
        with _open_raw(path) as raw:
            head = raw.read(2)
            raw.seek(0)
            if head != _GZIP_MAGIC:
                return _read_idx_stream(raw, path)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                return _read_idx_stream(gz, path)  # type: ignore[arg-type]
    except EOFError as e:
        raise DataError(f"{path}: gzip stream is truncated ({e})") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: gzip data is corrupt ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


# --------------------------------------------------------------------------- data sets


def _find_file(folder: Path, stem: str) -> Path | None:
    """The first of stem, stem.gz, stem.gz.part0 present in folder, as a read_idx path."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    if (folder / (stem + ".gz.part0")).is_file():
        return folder / (stem + ".gz")
    return None


def _find_folder(data_dir: Path, spec: _Spec) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir}: no such folder")
    candidates = [data_dir, *(data_dir / f for f in spec.folders)]
    for folder in candidates:
        if _find_file(folder, _FILES["x_train"]) is not None:
            return folder
    tried = ", ".join(f.name for f in candidates[1:])
    raise DataError(
        f"data dir {data_dir}: no {_FILES['x_train']}(.gz) found in it or in {tried}"
        " (expected MNIST IDX files)"
    )


def _normalize(images: np.ndarray, spec: _Spec) -> torch.Tensor:
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)
    return x.div_(255.0).sub_(spec.mean).div_(spec.std)


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str, spec: _Spec) -> None:
    """Images must be N x 28 x 28 uint8 and labels N values in range."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{where}: images are {images.dtype} {images.shape}, expected N x 28 x 28")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels are {labels.dtype} {labels.shape}, expected N integers")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{where}: no samples")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= spec.num_classes:
        raise DataError(f"{where}: labels span {lo}..{hi}, expected 0..{spec.num_classes - 1}")


def _build(name: str, arrays: dict[str, np.ndarray], where: str) -> Dataset:
    spec = _SPECS[name]
    for split in ("train", "test"):
        _check_pair(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{where} ({split})", spec)
    return Dataset(
        name=name,
        x_train=_normalize(arrays["x_train"], spec),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=_normalize(arrays["x_test"], spec),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=spec.num_classes,
        input_shape=(1, 28, 28),
    )


def _load_default_arrays() -> dict[str, np.ndarray]:
    asset = resources.files("trainer").joinpath("assets", DEFAULT_ASSET)
    try:
        with asset.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            missing = sorted(set(_FILES) - set(npz.files))
            if missing:
                raise DataError(f"default data set {asset}: missing arrays {missing}")
            return {k: npz[k] for k in _FILES}
    except FileNotFoundError as e:
        raise DataError(f"default data set {asset}: file is missing from the package") from e
    except (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile) as e:
        # A damaged zip or .npy header surfaces as any of these, depending on where it breaks.
        raise DataError(f"default data set {asset}: cannot read ({e})") from e


def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """Load a data set by name into memory.

    "default" is the small MNIST subset shipped in the package (data_dir is ignored; nothing
    is ever downloaded). "mnist" and "fashion-mnist" read the four IDX files from data_dir,
    from its `mnist/` or `fashion-mnist/` sub-folder, or from torchvision's `MNIST/raw/` or
    `FashionMNIST/raw/` layout; each file may be plain, `.gz` or split `.gz.partN`.
    """
    if name not in _SPECS:
        raise DataError(f"data set {name!r}: unknown (choose from {', '.join(DATASETS)})")
    if name == "default":
        return _build(name, _load_default_arrays(), f"default data set {DEFAULT_ASSET}")
    if data_dir is None:
        raise DataError(f"data set {name!r}: needs a data dir holding its IDX files")
    folder = _find_folder(Path(data_dir), _SPECS[name])
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _FILES.items():
        path = _find_file(folder, stem)
        if path is None:
            raise DataError(f"data dir {folder}: no {stem}(.gz) found")
        arrays[key] = read_idx(path)
    log.info(
        "loaded %s from %s: %d train, %d test",
        name,
        folder,
        len(arrays["y_train"]),
        len(arrays["y_test"]),
    )
    return _build(name, arrays, f"data dir {folder}")


# --------------------------------------------------------------------------- batching


def epoch_seed(seed: int, peer_index: int, epoch: int) -> int:
    """A 63-bit generator seed mixing (seed, peer_index, epoch) so no two triples collide."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, peer_index, epoch), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class BatchIterator:
    """Endless shuffled minibatches over one partition, resumable to the exact batch.

    Each epoch visits every index once in an order drawn by a torch.Generator seeded from
    (seed, peer_index, epoch), so the order depends on nothing else; `next()` rolls into the
    next epoch by itself (the last batch of an epoch may be short). The state is (epoch,
    position, generator state at the epoch's start), all plain ints and a uint8 tensor, so it
    fits a `torch.load(weights_only=True)` checkpoint.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int,
        peer_index: int = 0,
    ) -> None:
        self._x, self._y = x, y
        self._indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if self._indices.ndim != 1 or len(self._indices) == 0:
            raise ValueError("BatchIterator needs a non-empty 1-D index array")
        if int(self._indices.min()) < 0 or int(self._indices.max()) >= len(x) or len(x) != len(y):
            raise ValueError(f"BatchIterator indices must lie in [0, {len(x)}) for x and y alike")
        if batch_size < 1:
            raise ValueError(f"BatchIterator batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.peer_index = peer_index
        self._gen = torch.Generator()
        self._start_epoch(0)

    @property
    def num_samples(self) -> int:
        return len(self._indices)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _start_epoch(self, epoch: int, gen_state: torch.Tensor | None = None) -> None:
        if gen_state is None:
            self._gen.manual_seed(epoch_seed(self.seed, self.peer_index, epoch))
        else:
            self._gen.set_state(gen_state)
        self._epoch_gen_state = self._gen.get_state()
        self._order = self._indices[torch.randperm(self.num_samples, generator=self._gen)]
        self.epoch = epoch
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.num_samples:
            self._start_epoch(self.epoch + 1)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return self._x.index_select(0, idx), self._y.index_select(0, idx)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self._epoch_gen_state.clone(),
            "seed": self.seed,
            "peer_index": self.peer_index,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by state_dict() for the same seed, peer and partition size."""
        mine = (self.seed, self.peer_index, self.num_samples)
        theirs = (state.get("seed"), state.get("peer_index"), state.get("num_samples"))
        if mine != theirs:
            raise ValueError(f"data cursor is for (seed, peer, samples)={theirs}, not {mine}")
        epoch, position, gen = state["epoch"], state["position"], state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError("data cursor generator state must be a uint8 tensor")
        if not (0 <= int(epoch) and 0 <= int(position) <= self.num_samples):
            raise ValueError(f"data cursor epoch={epoch} position={position} is out of range")
        self._start_epoch(int(epoch), gen)
        self.position = int(position)
