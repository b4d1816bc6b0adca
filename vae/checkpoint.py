"""The one checkpoint format: a plain dict of state dicts, counters and the config as plain data.

:func:`save_checkpoint` writes it atomically (:func:`vae.files.atomic_write`); :func:`load_checkpoint`
reads it back with ``weights_only=True``, so a checkpoint can never run code; :func:`load_model`
rebuilds the VAE that a checkpoint's stored config describes.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch

from vae.config import ConfigError, validate_config
from vae.errors import UserError
from vae.files import StorageError, atomic_write
from vae.model import VAE

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "last_saved", "load_checkpoint", "load_model", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or not one of ours; the message says which."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    Args:
        state: plain data (tensors, dicts, lists, numbers, strings); nothing that needs pickling code.
        path: destination file; its folder is created.
    Returns:
        The path written.
    Raises:
        StorageError: the disk refused the write (full, read-only, ...); the message names the file,
            the free space and the last checkpoint saved in that folder (what a resume starts from).
    """
    try:
        with atomic_write(path) as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
    except StorageError as e:
        err = StorageError(e.errno, f"{e.strerror}; {last_saved(Path(path).parent)}")
        err.filename = e.filename
        raise err from e.__cause__
    return Path(path)


def last_saved(folder: Path) -> str:
    """``last checkpoint saved: <file> (epoch N, written at HH:MM:SS)``: the newest ``*.pth`` in
    ``folder`` (intact: every checkpoint is written atomically), or that there is none."""
    found = sorted(folder.glob("*.pth"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        return f"no checkpoint saved yet in {folder}"
    newest = found[-1]
    try:
        epoch = f"epoch {torch.load(newest, map_location='cpu', weights_only=True, mmap=True)['epoch']}, "
    except Exception:  # noqa: BLE001 - the name and time still say which file to resume from
        epoch = ""
    written = time.strftime("%H:%M:%S", time.localtime(newest.stat().st_mtime))
    return f"last checkpoint saved: {newest} ({epoch}written at {written})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, or holds objects that would run
            code when unpickled (refused without running them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train a model first, or check --model_path)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line advises an unsafe reload; name the offending object instead.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: refused: not a plain-data checkpoint ({first[:200]}). "
                              f"Only load checkpoints from sources you trust.") from None
    except Exception as e:  # noqa: BLE001 - the safe unpickler fails in many ways (IndexError, struct.error, ...)
        # on bytes that are not a checkpoint; none of them ran code, all mean the same to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or type(state.get("format")) is not int:
        raise CheckpointError(f"{path}: not a vae checkpoint (no 'format' key); was it written by vae-train?")
    if state["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']} is newer than this code "
                              f"({CHECKPOINT_FORMAT}); upgrade vae-mlops")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the VAE a checkpoint describes and load its weights (EMA weights when present).

    Returns:
        (model in eval mode, checkpoint dict).
    Raises:
        CheckpointError: see :func:`load_checkpoint`; also when the weights do not fit the config.
    """
    state = load_checkpoint(path, map_location=device)
    try:
        model = VAE(**validate_config(state["config"]).model.as_kwargs())
        ema = state.get("ema_state")
        model.load_state_dict(ema["module"] if use_ema and ema is not None else state["model_state"])
    except (KeyError, TypeError, RuntimeError, ConfigError, AttributeError, ValueError, IndexError) as e:
        detail = " ".join(str(e).split())[:300]  # one line, however long the cause's message
        raise CheckpointError(f"{path}: not a usable VAE checkpoint ({type(e).__name__}: {detail})") from None
    return model.to(device).eval(), state
