"""Shared helpers: device, seeding, gradient clipping, EMA, checkpoints, optimiser and schedule,
and the process heap setting training runs under (``retained_heap``).

One checkpoint format and one ``save_checkpoint`` / ``load_checkpoint`` pair: a plain dict of
state dicts, counters and the config as plain data, written atomically (temp file, fsync,
rename) and read back with ``weights_only=True`` so a checkpoint can never run code.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import pickle
import platform
import random
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or not one of ours; the message says which."""


def get_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; otherwise the named device.

    Raises:
        ConfigError: the named device is not available here (the CLIs turn it into one line, exit 2).
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (preference == "cuda" and not torch.cuda.is_available()) or (preference == "mps" and not mps):
        from vae.config import ConfigError

        raise ConfigError([f"device: {preference!r} was asked for but is not available on this machine; "
                           f"use --device auto or cpu"])
    return torch.device(preference)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gradient_clip(model: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm in place; returns the pre-clip norm as a tensor (no host sync)."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


# glibc mallopt parameters (malloc.h) and the defaults they are restored to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
_RETAINED = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_MMAP_THRESHOLD: 1 << 30}
_heap_lock = threading.Lock()
_heap_users = 0


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def retained_heap(enabled: bool = True):
    """Keep memory that tensors free inside the process while the block runs (Linux, glibc).

    Every training step allocates and frees the same activation buffers (12.8 MB each for a
    batch of 128 at 32×28×28). glibc serves blocks that large with ``mmap`` and gives them back
    with ``munmap`` (and trims its heap top past 128 KiB), so each step the kernel maps and
    zero-fills tens of megabytes of fresh pages: a third of a CPU training step went to page
    faults (BENCHMARKS.md, "Training throughput"). Inside the block, ``mallopt`` serves large
    blocks from the heap and never trims it, so freed buffers are reused as they are; peak
    memory is unchanged (the same buffers are live at the peak), the process just keeps it.

    On exit the glibc defaults are restored (a fixed 128 KiB mmap/trim threshold: glibc's dynamic
    threshold adjustment stays off once set) and ``malloc_trim(0)`` returns the free memory.
    Nested and concurrent blocks (trainers in several threads) share one setting: the last to
    leave restores it. Elsewhere (macOS, Windows, musl) it does nothing.
    """
    global _heap_users
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            for param, value in _RETAINED.items():
                libc.mallopt(param, value)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                for param, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    shadow ← decay·shadow + (1 − decay)·value after each step, for parameters and floating-point
    buffers alike (BatchNorm running statistics must describe the averaged weights, not the live
    ones: copying the live statistics onto averaged weights made validation loss jump between
    epochs); integer buffers (``num_batches_tracked``) are copied. ``module`` is the averaged
    model, used for evaluation and samples.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up as in TF's ExponentialMovingAverage: early averages are not dominated by init.
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_f, model_f, ema_i, model_i = list(self.module.parameters()), list(model.parameters()), [], []
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            (ema_f if b.is_floating_point() else ema_i).append(b_ema)
            (model_f if b.is_floating_point() else model_i).append(b)
        torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        if ema_i:  # _foreach_copy_ rejects an empty list (a model without BatchNorm has no buffers)
            torch._foreach_copy_(ema_i, model_i)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    Args:
        state: plain data (tensors, dicts, lists, numbers, strings); nothing that needs pickling code.
        path: destination file; its folder is created.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


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


def create_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation parameters get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass (foreach: ~10 passes); on a 2-core CPU the
    # step takes about a quarter of the time. Same update rule; other devices keep foreach.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, **({"fused": True} if fused else {"foreach": True}))


def create_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                        warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: linear warm-up, then cosine decay to 1% / step decay / constant."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if kind == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            return 0.1 ** int(t * 3 - 1e-9) if t > 0 else 1.0  # ×0.1 at 1/3 and 2/3 of training
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the VAE a checkpoint describes and load its weights (EMA weights when present).

    Returns:
        (model in eval mode, checkpoint dict).
    Raises:
        CheckpointError: see :func:`load_checkpoint`; also when the weights do not fit the config.
    """
    from vae.config import ConfigError, validate_config
    from vae.model import VAE

    state = load_checkpoint(path, map_location=device)
    try:
        m = validate_config(state["config"]).model
        model = VAE(**m.as_kwargs())
        ema = state.get("ema_state")
        model.load_state_dict(ema["module"] if use_ema and ema is not None else state["model_state"])
    except (KeyError, TypeError, RuntimeError, ConfigError, AttributeError, ValueError, IndexError) as e:
        detail = " ".join(str(e).split())[:300]  # one line, however long the cause's message
        raise CheckpointError(f"{path}: not a usable VAE checkpoint ({type(e).__name__}: {detail})") from None
    return model.to(device).eval(), state
