"""vae.data: reading and verifying IDX files, splits, index-batching and binarisation."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_digits, write_idx_dataset
from vae.data import (FILES, DataError, ImageBatches, Split, create_dataloader, idx_bytes, load_dataset,
                      split_train_val, static_binarize)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _replace(root: Path, name: str, content: bytes, gz: bool = True) -> None:
    """Overwrite one IDX file of a dataset written by ``write_idx_dataset``."""
    raw = root / "MNIST" / "raw"
    if gz:
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(content)
    else:
        (raw / name).write_bytes(content)


@pytest.fixture
def small_root(tmp_path, monkeypatch) -> Path:
    """A fresh tiny gzipped dataset (no SHA256SUMS) this test may break, and its own cache."""
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    return write_idx_dataset(tmp_path / "data", n_train=40, n_test=10, sums=False)


# -- reading ------------------------------------------------------------------------------------
def test_reads_the_gzipped_tiny_dataset(tiny_data_dir):
    data = load_dataset(tiny_data_dir, download=False)
    images, labels = make_digits(600, seed=0)
    assert data.train_images.shape == (600, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (200, 28, 28) and data.test_labels.shape == (200,)
    assert torch.equal(data.train_images, torch.from_numpy(images))
    assert torch.equal(data.train_labels, torch.from_numpy(labels).long())


def test_reads_uncompressed_idx_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "data", n_train=30, n_test=10, gz=False)
    data = load_dataset(root, download=False)
    assert len(data.train_images) == 30 and len(data.test_images) == 10
    assert not (tmp_path / "cache").exists()


def test_digests_are_the_sha256_of_the_uncompressed_content(tiny_data_dir):
    data = load_dataset(tiny_data_dir, download=False)
    images, _ = make_digits(600, seed=0)
    assert data.sha256["train-images-idx3-ubyte"] == hashlib.sha256(idx_bytes(images)).hexdigest()
    assert len(data.digest) == 64


def test_never_writes_into_the_data_dir_or_anywhere_else(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAE_CACHE_DIR", str(cache))
    root = write_idx_dataset(tmp_path / "data", n_train=30, n_test=10)
    before = _snapshot(root)
    load_dataset(root, download=False)
    assert _snapshot(root) == before
    assert not cache.exists()


@pytest.mark.parametrize("gz", [True, False])
def test_the_tensors_hold_the_files_values(tmp_path, gz):
    root = write_idx_dataset(tmp_path / "data", n_train=30, n_test=10, gz=gz)
    data = load_dataset(root, download=False)
    for split, n, seed in (("train", 30, 0), ("test", 10, 1)):
        images, labels = make_digits(n, seed)
        got_images, got_labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        assert got_images.dtype == torch.uint8 and got_images.shape == (n, 28, 28) and got_images.is_contiguous()
        assert got_labels.dtype == torch.int64
        assert torch.equal(got_images, torch.as_tensor(images)) and torch.equal(got_labels, torch.as_tensor(labels).long())
    data.train_images[0, 0, 0] = 7  # the tensors own their memory: writable, no warning


# -- verification -------------------------------------------------------------------------------
def test_sha256sums_mismatch_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "data", n_train=30, n_test=10)
    sums = root / "MNIST" / "raw" / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    lines = [("0" * 64 + "  t10k-labels-idx1-ubyte") if line.endswith("t10k-labels-idx1-ubyte") else line
             for line in lines]
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: SHA-256 .* SHA256SUMS says 0000"):
        load_dataset(root, download=False)


def test_truncated_file_is_rejected(small_root):
    images, _ = make_digits(40, seed=0)
    _replace(small_root, "train-images-idx3-ubyte", idx_bytes(images)[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        load_dataset(small_root, download=False)


def test_file_shorter_than_its_header_is_rejected(small_root):
    _replace(small_root, "t10k-labels-idx1-ubyte", b"\x00\x00")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: truncated IDX file"):
        load_dataset(small_root, download=False)


def test_trailing_bytes_are_rejected(small_root):
    _, labels = make_digits(40, seed=0)
    _replace(small_root, "train-labels-idx1-ubyte", idx_bytes(labels) + b"\x00")
    with pytest.raises(DataError, match="has trailing bytes"):
        load_dataset(small_root, download=False)


def test_wrong_magic_is_rejected(small_root):
    _, labels = make_digits(10, seed=1)
    _replace(small_root, "t10k-images-idx3-ubyte", idx_bytes(labels))  # a labels file in the images' place
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: wrong magic number 2049"):
        load_dataset(small_root, download=False)


def test_wrong_image_dimensions_are_rejected(small_root):
    _replace(small_root, "train-images-idx3-ubyte", idx_bytes(np.zeros((40, 27, 27), np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: images are 27x27, expected 28x28"):
        load_dataset(small_root, download=False)


def test_image_and_label_count_mismatch_is_rejected(small_root):
    _replace(small_root, "train-labels-idx1-ubyte", idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(DataError, match="40 images but .*train-labels-idx1-ubyte.gz has 39 labels"):
        load_dataset(small_root, download=False)


def test_corrupt_gzip_is_rejected_naming_the_file(small_root):
    (small_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: cannot be read"):
        load_dataset(small_root, download=False)


def test_missing_files_message_names_the_four_files_and_where(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "nowhere", download=False)
    message = str(info.value)
    for name in FILES.values():
        assert name in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "VAE_DATA_DIR" in message


def test_fashion_mnist_reads_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "data", n_train=20, n_test=10, folder="FashionMNIST")
    data = load_dataset(root, dataset="fashion_mnist", download=False)
    assert data.name == "fashion_mnist" and len(data.train_images) == 20


# -- splits, batches, binarisation ---------------------------------------------------------------
def test_split_sizes(tiny_data_dir):
    train, val = split_train_val(load_dataset(tiny_data_dir, download=False), val_size=100, seed=0)
    assert (len(train), len(val)) == (500, 100)


def test_split_is_fixed_by_seed_and_changes_with_it(tiny_data_dir):
    data = load_dataset(tiny_data_dir, download=False)
    a, b, c = (split_train_val(data, 100, seed=s)[1] for s in (3, 3, 4))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_split_is_disjoint_and_covers_the_training_set(tiny_data_dir):
    data = load_dataset(tiny_data_dir, download=False)
    train, val = split_train_val(data, 100, seed=1)
    flat = lambda t: {bytes(img.numpy().tobytes()) for img in t}  # noqa: E731
    assert flat(train.images) | flat(val.images) == flat(data.train_images)
    assert len(train) + len(val) == len(data.train_images)


def test_max_train_samples_keeps_the_first_images(tiny_data_dir):
    train, val = split_train_val(load_dataset(tiny_data_dir, download=False), 50, seed=0, max_train_samples=200)
    assert (len(train), len(val)) == (150, 50)


def test_val_size_leaving_no_training_images_is_rejected(tiny_data_dir):
    with pytest.raises(DataError, match="val_size 600 leaves no training images"):
        split_train_val(load_dataset(tiny_data_dir, download=False), val_size=600)


def _split(n=23):
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(n))


def _labels(batches, start=0):
    return [labels.tolist() for _, labels in batches.iter_from(start)]


def test_batches_are_float_images_in_unit_interval():
    x, y = next(iter(ImageBatches(_split(), batch_size=5)))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (5,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_batch_order_is_reproducible_from_seed_and_epoch():
    a, b = ImageBatches(_split(), 5, seed=7), ImageBatches(_split(), 5, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert _labels(a) == _labels(b)


def test_batch_order_changes_with_the_epoch():
    a = ImageBatches(_split(), 5, seed=7)
    first = _labels(a)
    a.set_epoch(1)
    assert _labels(a) != first


def test_every_image_appears_once_per_epoch():
    labels = sum(_labels(ImageBatches(_split(), 5, seed=1)), [])
    assert sorted(labels) == list(range(23))


def test_iter_from_resumes_mid_epoch_with_the_same_batches():
    batches = ImageBatches(_split(), 5, seed=7, binarize="dynamic")
    batches.set_epoch(2)
    full = list(batches)
    tail = list(batches.iter_from(2))
    assert len(tail) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_len_counts_partial_and_dropped_last_batches():
    assert len(ImageBatches(_split(23), 5)) == 5
    assert len(ImageBatches(_split(23), 5, drop_last=True)) == 4
    assert len(ImageBatches(_split(23), 5, max_batches=2)) == 2
    assert len(list(ImageBatches(_split(23), 5, max_batches=2))) == 2


def test_unshuffled_batches_keep_the_split_order():
    assert sum(_labels(ImageBatches(_split(), 5, shuffle=False)), []) == list(range(23))


def test_dynamic_binarisation_gives_zeros_and_ones_and_is_reproducible():
    a = ImageBatches(_split(), 5, seed=1, binarize="dynamic")
    x = torch.cat([x for x, _ in a])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, torch.cat([x for x, _ in ImageBatches(_split(), 5, seed=1, binarize="dynamic")]))


def test_dynamic_binarisation_draws_anew_each_epoch():
    a = ImageBatches(_split(), 23, shuffle=False, binarize="dynamic")
    x0 = next(iter(a))[0]
    a.set_epoch(1)
    assert not torch.equal(x0, next(iter(a))[0])


def test_dynamic_binarisation_keeps_the_pixel_mean():
    split = Split(torch.full((200, 28, 28), 64, dtype=torch.uint8), torch.zeros(200, dtype=torch.long))
    x = next(iter(ImageBatches(split, 200, binarize="dynamic")))[0]
    assert float(x.mean()) == pytest.approx(64 / 255, abs=0.01)


def test_static_binarisation_is_fixed_zeros_and_255s():
    images = _split().images
    a, b = static_binarize(images, seed=3), static_binarize(images, seed=3)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0, 255}


def test_channels_last_batches_have_channels_last_layout():
    x = next(iter(ImageBatches(_split(), 5, channels_last=True)))[0]
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_create_dataloader_wraps_a_split():
    loader = create_dataloader(_split(), batch_size=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 1, 28, 28) and float(x.max()) <= 1.0 and y.tolist() == [0, 1, 2, 3]


# -- the real MNIST -------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.slow
def test_real_mnist_has_60000_and_10000_images_with_the_usual_mean(real_data_dir):
    data = load_dataset(real_data_dir, download=False)
    assert data.train_images.shape == (60000, 28, 28)
    assert data.test_images.shape == (10000, 28, 28)
    assert float(data.train_images.float().mean() / 255) == pytest.approx(0.1307, abs=1e-4)
    train, val = split_train_val(data)
    assert (len(train), len(val)) == (55000, 5000)
