"""Build trainer/assets/mnist-small.npz, the default data set shipped in the package.

Source: the MNIST database of handwritten digits by Yann LeCun, Corinna Cortes and
Christopher J.C. Burges, licensed under Creative Commons Attribution-Share Alike 3.0
(CC BY-SA 3.0). It is read from the canonical IDX files in ../shared/data/mnist (see that
folder's README for where each file came from and its checksums).

The asset holds the FIRST 12,000 training images and the FIRST 2,000 test images, with their
labels, as uint8 arrays: x_train (12000, 28, 28), y_train (12000,), x_test (2000, 28, 28),
y_test (2000,). It is a standard .npz (load with np.load(..., allow_pickle=False)), written
with fixed zip timestamps so the same inputs give the same bytes. The script also rewrites
trainer/assets/README.md with the provenance and the asset's sha256.

Usage, from the repository root:

    .venv/bin/python scripts/make_default_dataset.py [--source ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The script runs from a checkout that need not be installed, so import the package from it.
sys.path.insert(0, str(ROOT))

from trainer.data import DEFAULT_ASSET, read_idx  # noqa: E402

N_TRAIN = 12_000  # 3,000 samples per peer with 4 peers: the demo trains in seconds per epoch
N_TEST = 2_000  # enough for accuracy to +-1%, cheap to evaluate every few steps
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the file is reproducible byte for byte

README = """\
# trainer/assets

`{asset}` is the default data set: a real subset of MNIST shipped inside the package so
`gossip-train` runs on a fresh machine with no download.

- content: the first {n_train:,} training images and the first {n_test:,} test images of
  MNIST, with their labels, as uint8 arrays:
  `x_train` {xtr}, `y_train` {ytr}, `x_test` {xte}, `y_test` {yte}
- train label counts 0..9: {counts}
- format: `.npz` (zip of `.npy`), no pickled objects; load with
  `np.load(path, allow_pickle=False)`
- built by: `scripts/make_default_dataset.py` from the canonical IDX files in
  `../shared/data/mnist` (deterministic: same inputs, same bytes)
- source and license: the MNIST database of handwritten digits by Yann LeCun, Corinna Cortes
  and Christopher J.C. Burges; Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0)
- sha256 of `{asset}`: `{sha}`
"""


def load_subset(source: Path) -> dict[str, np.ndarray]:
    """The first N_TRAIN / N_TEST samples of each split, as uint8 arrays."""
    arrays = {
        "x_train": read_idx(source / "train-images-idx3-ubyte.gz")[:N_TRAIN],
        "y_train": read_idx(source / "train-labels-idx1-ubyte.gz")[:N_TRAIN],
        "x_test": read_idx(source / "t10k-images-idx3-ubyte.gz")[:N_TEST],
        "y_test": read_idx(source / "t10k-labels-idx1-ubyte.gz")[:N_TEST],
    }
    return {k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in arrays.items()}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed timestamps and order for reproducible bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arrays[name], allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    args = parser.parse_args()
    arrays = load_subset(args.source)
    out = ROOT / "trainer" / "assets" / DEFAULT_ASSET
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, arrays)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    counts = " ".join(str(c) for c in np.bincount(arrays["y_train"], minlength=10))
    shapes = {k: str(v.shape).replace(" ", "") for k, v in arrays.items()}
    (out.parent / "README.md").write_text(
        README.format(
            asset=DEFAULT_ASSET,
            n_train=N_TRAIN,
            n_test=N_TEST,
            xtr=shapes["x_train"],
            ytr=shapes["y_train"],
            xte=shapes["x_test"],
            yte=shapes["y_test"],
            counts=counts,
            sha=sha,
        )
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes, sha256 {sha})")


if __name__ == "__main__":
    main()
