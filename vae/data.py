"""MNIST and Fashion-MNIST as in-memory uint8 tensors, verified, split and batched by index.

The four IDX files (gzipped or not) are read from ``<data_dir>/<MNIST|FashionMNIST>/raw`` into
memory and parsed here; nothing is written anywhere. Content is checked before anything is used:
IDX header (magic number, dimensions, exact size), image/label counts, and the SHA-256 of each
uncompressed file against a ``SHA256SUMS`` file beside them when one exists. torchvision is
imported only to download missing files (importing it costs a process ~2 s).

Training never touches PIL: the images stay one uint8 tensor and :class:`ImageBatches` slices
batches out of it by index, converting to float (and binarising) a batch at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vae import settings
from vae.errors import UserError
from vae.files import write_atomic

DatasetName = Literal["mnist", "fashion_mnist"]
Binarize = Literal["none", "static", "dynamic"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


class DataError(UserError, RuntimeError):
    """The data is missing or invalid; the message names the file and the fix."""


@dataclass(frozen=True)
class ImageData:
    """A dataset in memory. Images uint8 (N, 28, 28); labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    sha256: dict[str, str]  # file name -> SHA-256 of the uncompressed IDX content
    name: str = "mnist"

    @property
    def digest(self) -> str:
        """One SHA-256 over the four files' digests: the dataset's identity for caching and tracking."""
        joined = "".join(f"{k}:{self.sha256[k]};" for k in sorted(self.sha256))
        return hashlib.sha256(joined.encode()).hexdigest()


def default_data_dir() -> str:
    """``$VAE_DATA_DIR`` when set, else ``./data`` (:mod:`vae.settings`)."""
    return settings.current().data_dir or "./data"


def missing_data_message(data_dir: str | Path, dataset: DatasetName = "mnist") -> str:
    raw = Path(data_dir) / _FOLDERS[dataset] / "raw"
    names = "\n".join(f"    {raw / (f + '.gz')}" for f in FILES.values())
    return (f"{dataset} data not found in {data_dir!s} and could not be downloaded.\n"
            f"  Put these four IDX files (gzipped or not) there:\n{names}\n"
            f"  or point --data_dir / VAE_DATA_DIR at a folder that has {_FOLDERS[dataset]}/raw/.")


def _find(raw_dirs: list[Path], name: str) -> Path | None:
    for d in raw_dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib.error: corrupt deflate data
        raise DataError(f"{path}: cannot be read ({e}); replace it with a good copy") from None


def check_idx(content: bytes, path: Path | str, kind: Literal["images", "labels"]) -> int:
    """Validate an IDX header and size; return the item count.

    Raises:
        DataError: naming the file and what is wrong (magic, dimensions, truncated or too long).
    """
    magic_expected, header = (_IMAGE_MAGIC, 16) if kind == "images" else (_LABEL_MAGIC, 8)
    if len(content) < header:
        raise DataError(f"{path}: truncated IDX file ({len(content)} bytes, the header alone is {header})")
    magic = struct.unpack(">I", content[:4])[0]
    if magic != magic_expected:
        raise DataError(f"{path}: wrong magic number {magic} (expected {magic_expected} for {kind}); "
                        f"is this the right file?")
    count = struct.unpack(">I", content[4:8])[0]
    item = 1
    if kind == "images":
        rows, cols = struct.unpack(">II", content[8:16])
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        item = rows * cols
    expected = header + count * item
    if len(content) != expected:
        what = "truncated" if len(content) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says {count} {kind} ({expected} bytes), file has {len(content)}")
    return count


def idx_bytes(array) -> bytes:
    """IDX encoding of a uint8 array (numpy or torch): (N,) labels or (N, 28, 28) images, as :func:`check_idx` reads."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = _LABEL_MAGIC if array.ndim == 1 else _IMAGE_MAGIC
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_files(raw: str | Path, arrays: dict[str, Any], gz: bool = True, sums: bool = True) -> Path:
    """Write a dataset's arrays (keys of :data:`FILES`: ``train_images``, ...) as IDX files in ``raw``
    (gzipped unless ``gz`` is false; each written atomically), with a ``SHA256SUMS`` of the
    uncompressed content that :func:`load_dataset` checks; returns ``raw``."""
    raw = Path(raw)
    raw.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, array in arrays.items():
        content, name = idx_bytes(array), FILES[key]
        write_atomic(raw / (f"{name}.gz" if gz else name), gzip.compress(content, mtime=0) if gz else content)
        lines.append(f"{hashlib.sha256(content).hexdigest()}  {name}")
    if sums:
        write_atomic(raw / "SHA256SUMS", "\n".join(lines) + "\n")
    return raw


def _read_sums(raw_dirs: list[Path]) -> dict[str, str]:
    for d in raw_dirs:
        sums = d / "SHA256SUMS"
        if sums.is_file():
            out = {}
            for line in sums.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    out[parts[1].lstrip("*")] = parts[0].lower()
            return out
    return {}


def _try_download(data_dir: Path, dataset: DatasetName) -> None:
    from torchvision import datasets  # here, not at the top: only a download needs it (~2 s to import)

    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception:  # noqa: BLE001 - any failure (offline, read-only) leads to the same advice
        raise DataError(missing_data_message(data_dir, dataset)) from None


def read_raw_files(data_dir: str | Path, dataset: DatasetName = "mnist",
                   download: bool = True) -> tuple[dict[str, bytes], dict[str, str]]:
    """Locate, read and verify the four IDX files.

    Returns:
        (contents, sha256): the uncompressed IDX bytes by :data:`FILES` key (``train_images``, ...)
        and the SHA-256 of each file's content by file name.
    Raises:
        DataError: files missing (with where to put them) or invalid (naming file and problem).
    """
    data_dir = Path(data_dir).expanduser()
    raw_dirs = [data_dir / _FOLDERS[dataset] / "raw", data_dir]
    found = {k: _find(raw_dirs, f) for k, f in FILES.items()}
    if not all(found.values()):
        if not download:
            raise DataError(missing_data_message(data_dir, dataset))
        _try_download(data_dir, dataset)
        found = {k: _find(raw_dirs, f) for k, f in FILES.items()}
        if not all(found.values()):
            raise DataError(missing_data_message(data_dir, dataset))

    sums = _read_sums(raw_dirs)
    contents, digests, counts = {}, {}, {}
    for key, path in found.items():
        content = _read_bytes(path)
        counts[key] = check_idx(content, path, "images" if key.endswith("images") else "labels")
        digests[FILES[key]] = hashlib.sha256(content).hexdigest()
        want = sums.get(FILES[key])
        if want is not None and want != digests[FILES[key]]:
            raise DataError(f"{path}: SHA-256 of the content is {digests[FILES[key]]}, SHA256SUMS says {want}; "
                            f"the file is corrupt or not the original: replace it")
        contents[key] = content
    for split in ("train", "test"):
        if counts[f"{split}_images"] != counts[f"{split}_labels"]:
            raise DataError(f"{found[f'{split}_images']}: {counts[f'{split}_images']} images but "
                            f"{found[f'{split}_labels']} has {counts[f'{split}_labels']} labels")
    return contents, digests


def _idx_tensor(content: bytes) -> torch.Tensor:
    """A verified IDX file's items as a uint8 tensor: (N, 28, 28) images or (N,) labels."""
    images = struct.unpack(">I", content[:4])[0] == _IMAGE_MAGIC
    array = np.frombuffer(content, dtype=np.uint8, offset=16 if images else 8).copy()  # writable, owned
    return torch.from_numpy(array.reshape(-1, 28, 28) if images else array)


def load_dataset(data_dir: str | Path | None = None, dataset: DatasetName = "mnist", download: bool = True) -> ImageData:
    """Read a dataset's train and test sets as uint8 tensors (verified first; see module doc)."""
    contents, digests = read_raw_files(data_dir if data_dir is not None else default_data_dir(), dataset, download)
    t = {key: _idx_tensor(content) for key, content in contents.items()}
    return ImageData(t["train_images"], t["train_labels"].long(), t["test_images"], t["test_labels"].long(),
                     digests, dataset)


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x 28 x 28) and labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def split_train_val(data: ImageData, val_size: int = 5000, seed: int = 42,
                    max_train_samples: int = 0) -> tuple[Split, Split]:
    """A seeded train/validation split of the training set (default 55,000 / 5,000).

    ``max_train_samples`` > 0 keeps only the first N training images before splitting.
    """
    train_idx, val_idx = split_indices(len(data.train_images), val_size, seed, max_train_samples)
    images, labels = data.train_images, data.train_labels
    return Split(images[train_idx], labels[train_idx]), Split(images[val_idx], labels[val_idx])


def split_indices(num_images: int, val_size: int = 5000, seed: int = 42,
                  max_train_samples: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into the training set of :func:`split_train_val`'s split:
    what a model trained with this split saw, and what it was validated on."""
    n = min(num_images, max_train_samples) if max_train_samples else num_images
    if val_size >= n:
        raise DataError(f"val_size {val_size} leaves no training images: the training set has {n}; lower val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def static_binarize(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One fixed Bernoulli draw per pixel (p = intensity), as uint8 0/255: statically binarised."""
    probs = images.float().div(255)
    return (torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def eval_split(split: Split, binarize: str, seed: int, limit: int = 0) -> Split:
    """The images an evaluation scores: the first ``limit`` (0 = all), binarised once with a fixed
    seed under the binarised protocols ('static', 'dynamic'), so scores do not depend on batching."""
    images, labels = (split.images[:limit], split.labels[:limit]) if limit else (split.images, split.labels)
    if binarize in ("static", "dynamic"):
        images = static_binarize(images, seed)
    return Split(images, labels)


class ImageBatches:
    """Batches of float images in [0, 1], (B, 1, 28, 28), sliced by index from a uint8 tensor.

    The order of epoch e is a permutation seeded by (seed, e), and dynamic binarisation of batch k
    draws from a generator seeded by (seed, e, k): any batch can be reproduced from its epoch and
    index alone, which makes resuming mid-epoch exact without saving iterator state.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = True, binarize: Binarize = "none",
                 seed: int = 0, device: torch.device | str = "cpu", drop_last: bool = False,
                 channels_last: bool = False, max_batches: int = 0):
        images = static_binarize(split.images, seed) if binarize == "static" else split.images
        self.images = images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.shuffle, self.binarize = batch_size, shuffle, binarize
        self.seed, self.device, self.drop_last, self.channels_last = seed, torch.device(device), drop_last, channels_last
        self.max_batches = max_batches
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.images)
        full = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(full, self.max_batches) if self.max_batches else full

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.images))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=gen)

    def batch(self, index: torch.Tensor, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].unsqueeze(1).float().div_(255)
        if self.binarize == "dynamic":
            gen = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + k)
            x = torch.bernoulli(x, generator=gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]

    def iter_from(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the current epoch from batch index ``start`` on."""
        order = self.order(self.epoch).to(self.device)
        for k in range(start, len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.batch(idx, self.epoch, k)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)


def create_dataloader(dataset: Dataset | Split, batch_size: int = 128, shuffle: bool = True,
                      num_workers: int = 0, **kwargs) -> DataLoader:
    """A ``torch.utils.data.DataLoader``, kept for API compatibility with the seed.

    A :class:`Split` becomes a ``TensorDataset`` of float images in [0, 1] and labels. Training
    uses :class:`ImageBatches`, which is several times faster on small images.
    """
    if isinstance(dataset, Split):
        dataset = TensorDataset(dataset.images.unsqueeze(1).float().div(255), dataset.labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs)

