"""Images a user brings to be scored: an IDX file, a ``.npy`` array or a folder of PNGs.

Everything comes back as one uint8 tensor (N, 28, 28), the form the training data has, with the
SHA-256 of the bytes read (the scoring run's data digest). A file that cannot be used raises
:class:`ImageFileError` naming the file and the problem, so a command line prints one line.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from vae.data import DataError, _read_bytes, check_idx

__all__ = ["ImageFileError", "read_images"]

SIZE = 28


class ImageFileError(DataError):
    """A file of images to score is missing, unreadable or of the wrong shape or type."""


def _from_array(array: np.ndarray, path: Path) -> torch.Tensor:
    """(N, 28, 28) or (N, 1, 28, 28) uint8 (0-255) or float in [0, 1] -> uint8 (N, 28, 28)."""
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2 and array.shape == (SIZE, SIZE):
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE) or len(array) == 0:
        raise ImageFileError(f"{path}: expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype.kind != "f":
        raise ImageFileError(f"{path}: expected uint8 (0-255) or float (0-1) pixels, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ImageFileError(f"{path}: contains NaN or infinite pixels; float pixels must be finite, in [0, 1]")
    if array.min() < 0 or array.max() > 1:
        raise ImageFileError(f"{path}: float pixels must be in [0, 1], got min {array.min():.3g}, "
                             f"max {array.max():.3g} (uint8 arrays hold 0-255)")
    return torch.from_numpy(np.rint(array.astype(np.float64) * 255).astype(np.uint8))


def _read_npy(path: Path) -> tuple[torch.Tensor, bytes]:
    content = _read_bytes(path)
    try:
        array = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ImageFileError(f"{path}: not a readable .npy array ({e})") from None
    return _from_array(array, path), content


def _read_idx(path: Path) -> tuple[torch.Tensor, bytes]:
    content = _read_bytes(path)
    try:
        count = check_idx(content, path, "images")
    except DataError as e:
        raise ImageFileError(f"{e} (expected an IDX image file, a .npy array or a folder of PNGs)") from None
    array = np.frombuffer(content, dtype=np.uint8, offset=16).reshape(count, SIZE, SIZE)
    if count == 0:
        raise ImageFileError(f"{path}: holds no images")
    return torch.from_numpy(array.copy()), content


def _read_pngs(folder: Path) -> tuple[torch.Tensor, bytes]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise ImageFileError(f"{folder}: a folder with no .png files")
    images, digest = [], hashlib.sha256()
    for path in files:
        try:
            with Image.open(path) as img:
                gray = np.asarray(img.convert("L"))
        except (OSError, UnidentifiedImageError) as e:
            raise ImageFileError(f"{path}: not a readable PNG ({e})") from None
        if gray.shape != (SIZE, SIZE):
            raise ImageFileError(f"{path}: {gray.shape[1]}x{gray.shape[0]} pixels, expected 28x28")
        images.append(gray)
        digest.update(gray.tobytes())
    return torch.from_numpy(np.stack(images)), digest.digest()


def read_images(path: str | Path) -> tuple[torch.Tensor, str]:
    """Images to score from an IDX file (``.gz`` or not), a ``.npy`` array or a folder of PNGs.

    Returns:
        (images, digest): uint8 (N, 28, 28) and the SHA-256 of the content read (hex).
    Raises:
        ImageFileError: the path is missing, or its content is not 28x28 grey images.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        images, content = _read_pngs(path)
    elif not path.is_file():
        raise ImageFileError(f"{path}: no such file or folder (expected an IDX file, a .npy file or a folder of PNGs)")
    elif path.name.endswith((".npy", ".npy.gz")):
        images, content = _read_npy(path)
    else:
        images, content = _read_idx(path)
    return images, hashlib.sha256(content).hexdigest()
