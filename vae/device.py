"""Where tensors live and how runs are seeded: ``get_device``, ``set_seed``, ``cpu_has_bf16_units``."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch

from vae.config import ConfigError

__all__ = ["cpu_has_bf16_units", "get_device", "set_seed"]


def get_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; otherwise the named device.

    Raises:
        ConfigError: the named device is not available here (the CLIs turn it into one line, exit 2).
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (preference == "cuda" and not torch.cuda.is_available()) or (preference == "mps" and not mps):
        raise ConfigError([f"device: {preference!r} was asked for but is not available on this machine; "
                           f"use --device auto or cpu"])
    return torch.device(preference)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.cache
def cpu_has_bf16_units(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), read from Linux's
    ``/proc/cpuinfo`` flags; False where that file is absent (other systems: not detected).

    Without such units, bf16 autocast on the CPU converts every operand and runs slower than float32.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags
