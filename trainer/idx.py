"""Reading data sets from disk as numpy arrays: IDX files (plain, gzip, split) and the shipped set.

Nothing here needs torch, so a process can read and decompress its data in a thread while
it is still importing torch (the zygote does; see ``trainer.data`` for the tensors).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

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
class Spec:
    """What a named image data set looks like on disk and how to normalize it."""

    folders: tuple[str, ...]  # sub-folders of data_dir to try, after data_dir itself
    mean: float  # training-set pixel mean on the [0, 1] scale
    std: float  # training-set pixel std on the [0, 1] scale
    num_classes: int  # labels are 0..num_classes-1


_MNIST = Spec(("mnist", "MNIST/raw"), 0.1307, 0.3081, 10)
SPECS: dict[str, Spec] = {
    "default": _MNIST,
    "mnist": _MNIST,
    "fashion-mnist": Spec(("fashion-mnist", "FashionMNIST/raw"), 0.2860, 0.3530, 10),
}

_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


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


def _gunzip(blob: bytes, path: Path) -> bytes:
    """Decompress a whole gzip file, one zlib call per member (CRC and length checked).

    One call instead of ``GzipFile``'s many small reads: faster, and zlib releases the GIL
    for its length, so a reader thread overlaps whatever the main thread is doing.
    """
    limit = 64 + MAX_IDX_ELEMENTS * 8  # the largest IDX file read_idx would accept
    out: list[bytes] = []
    total, data = 0, blob
    while data:
        member = zlib.decompressobj(wbits=31)
        out.append(member.decompress(data, limit - total + 1))
        total += len(out[-1])
        if total > limit:
            raise DataError(f"{path}: decompresses to more than any IDX file read_idx accepts")
        if not member.eof:
            raise EOFError("compressed data ended before the end-of-stream marker")
        data = member.unused_data
    return b"".join(out)


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
            return _read_idx_stream(io.BytesIO(_gunzip(raw.read(), path)), path)
    except EOFError as e:
        raise DataError(f"{path}: gzip stream is truncated ({e})") from e
    except zlib.error as e:
        why = str(e)
        if "incorrect data check" in why or "incorrect length check" in why:
            why = f"CRC or length check failed: {why}"
        raise DataError(f"{path}: gzip data is corrupt ({why})") from e
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


def _find_folder(data_dir: Path, spec: Spec) -> Path:
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


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str, spec: Spec) -> None:
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


def load_arrays(name: str, data_dir: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays of a named data set (``x_train``, ``y_train``, ``x_test``, ``y_test``)
    and where they came from, checked for shape, type and label range.

    "default" is the small MNIST subset shipped in the package (data_dir is ignored; nothing
    is ever downloaded). "mnist" and "fashion-mnist" read the four IDX files from data_dir,
    from its `mnist/` or `fashion-mnist/` sub-folder, or from torchvision's `MNIST/raw/` or
    `FashionMNIST/raw/` layout; each file may be plain, `.gz` or split `.gz.partN`.
    """
    if name not in SPECS:
        raise DataError(f"data set {name!r}: unknown (choose from {', '.join(DATASETS)})")
    if name == "default":
        arrays, where = _load_default_arrays(), f"default data set {DEFAULT_ASSET}"
    else:
        if data_dir is None:
            raise DataError(f"data set {name!r}: needs a data dir holding its IDX files")
        folder = _find_folder(Path(data_dir), SPECS[name])
        arrays = {}
        for key, stem in _FILES.items():
            path = _find_file(folder, stem)
            if path is None:
                raise DataError(f"data dir {folder}: no {stem}(.gz) found")
            arrays[key] = read_idx(path)
        where = f"data dir {folder}"
        log.info(
            "loaded %s from %s: %d train, %d test",
            name,
            folder,
            len(arrays["y_train"]),
            len(arrays["y_test"]),
        )
    for split in ("train", "test"):
        _check_pair(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{where} ({split})", SPECS[name])
    return arrays, where
