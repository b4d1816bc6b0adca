"""Bad IDX files are refused with one line naming the file and the problem; nothing is cached."""

from __future__ import annotations

import functools
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FILES, make_digits, write_idx_dataset
from tests.reliability.conftest import assert_one_line_error, cli_flags, tally
from vae.data import DataError, idx_bytes, load_dataset

TRAIN_IMAGES = FILES[("train", "images")]
TRAIN_LABELS = FILES[("train", "labels")]


N_TRAIN, N_TEST = 200, 20


@functools.lru_cache(maxsize=None)
def _good_images(n: int = N_TRAIN) -> bytes:
    return idx_bytes(make_digits(n, 0)[0])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("pristine"), n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A fresh copy of a small, valid, gzipped dataset with SHA256SUMS, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def _rewrite(root: Path, name: str, content: bytes, fix_sums: bool = True) -> Path:
    """Replace one gzipped file of a dataset; keep SHA256SUMS consistent unless told not to."""
    raw = root / "MNIST" / "raw"
    path = raw / f"{name}.gz"
    with gzip.open(path, "wb") as f:
        f.write(content)
    if fix_sums:
        sums = raw / "SHA256SUMS"
        lines = [ln for ln in sums.read_text().splitlines() if not ln.endswith(name)]
        sums.write_text("\n".join(lines + [f"{hashlib.sha256(content).hexdigest()}  {name}"]) + "\n")
    return path


def _corrupt_gzip(root: Path, name: str) -> Path:
    path = root / "MNIST" / "raw" / f"{name}.gz"
    data = bytearray(path.read_bytes())
    data[20:60] = b"\xff" * 40  # inside the deflate stream
    path.write_bytes(bytes(data))
    return path


BAD_SETS = {
    # name: (how to damage a good dataset, words the message must contain)
    "truncated": (lambda r: _rewrite(r, TRAIN_IMAGES, _good_images()[:-100]), "truncated"),
    "trailing_bytes": (lambda r: _rewrite(r, TRAIN_IMAGES, _good_images() + b"\0" * 7), "trailing bytes"),
    "header_only_part": (lambda r: _rewrite(r, TRAIN_IMAGES, _good_images()[:10]), "truncated"),
    "wrong_magic": (lambda r: _rewrite(r, TRAIN_IMAGES, struct.pack(">I", 2049) + _good_images()[4:]), "magic"),
    "labels_as_images": (lambda r: _rewrite(r, TRAIN_LABELS, _good_images()), "magic"),
    "wrong_dims": (lambda r: _rewrite(r, TRAIN_IMAGES, idx_bytes(np.zeros((N_TRAIN, 32, 32), np.uint8))), "32x32"),
    "count_mismatch": (lambda r: _rewrite(r, TRAIN_LABELS, idx_bytes(make_digits(N_TRAIN - 1, 0)[1])), "labels"),
    "checksum_mismatch": (lambda r: _rewrite(r, TRAIN_IMAGES, _good_images()[:-1] + b"\x01", fix_sums=False),
                          "SHA-256"),
    "corrupt_gzip": (lambda r: _corrupt_gzip(r, TRAIN_IMAGES), "cannot be read"),
    "empty_file": (lambda r: _rewrite(r, TRAIN_LABELS, b""), "truncated"),
}


def _cached_files(cache: Path) -> list[Path]:
    """The files under ``cache`` but the compiled kernels (``cli_env`` puts the session's there)."""
    found = cache.rglob("*") if cache.exists() else []
    return [p for p in found if p.is_file() and p.parent != cache / "kernels"]


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_idx_refused_in_one_line_naming_the_file_and_nothing_cached(case, dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAE_CACHE_DIR", str(cache))
    root = dataset
    damage, words = BAD_SETS[case]
    bad_path = damage(root)
    tally("bad_inputs")
    with pytest.raises(DataError) as err:
        load_dataset(root, "mnist", download=False)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(bad_path.parent) in message and bad_path.name.split(".")[0][:9] in message, message
    assert words in message, message
    assert _cached_files(cache) == [], "a rejected dataset left files in the cache"


def test_good_set_loads(dataset, tmp_path, monkeypatch):
    """Control for the test above: the same layout, undamaged, loads (and caches nothing either)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAE_CACHE_DIR", str(cache))
    data = load_dataset(dataset, "mnist", download=False)
    assert data.train_images.shape == (N_TRAIN, 28, 28) and len(data.test_labels) == N_TEST
    assert _cached_files(cache) == []


def test_training_cli_refuses_a_truncated_file_with_exit_2(dataset, tmp_path, procs, tiny_config):
    root = dataset
    bad = _rewrite(root, TRAIN_IMAGES, _good_images()[:-100])
    tally("bad_inputs")
    flags = {k: tiny_config[k] for k in ("hidden_dims", "latent_dim", "batch_size", "val_size", "num_epochs")}
    res = procs.python("-m", "vae.train", "--data_dir", str(root), "--checkpoint_dir", str(tmp_path / "ck"),
                       "--progress", "false", *cli_flags(flags))
    assert res.returncode == 2, res
    assert_one_line_error(res.stderr, str(bad), "truncated")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("*.pth"))
    assert _cached_files(tmp_path / "cache") == []
