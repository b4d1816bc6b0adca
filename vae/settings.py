"""Every ``VAE_*`` environment variable the project reads: read here, and nowhere else.

=====================  ========================================================  =======================================
variable               what it sets                                              when unset
=====================  ========================================================  =======================================
``VAE_DATA_DIR``       the folder holding ``<Dataset>/raw`` IDX files: the       ``./data``
                       ``data_dir`` of every preset (``get_default_config``)
``VAE_CACHE_DIR``      the pipeline's dataset tensors, the FID classifier,       ``~/.cache/vae-mlops``
                       the fast path's compiled kernel (``kernels/``)
``VAE_FAST_DEV_RUN``   N > 0: every ``VAETrainer`` run is a smoke run, 1 epoch   off
                       of N batches; the trainer warns that it applied it
``VAE_MLRUNS_DIR``     the embedded MLflow store (``mlflow.db``, artifacts),     ``./mlruns``
                       used when ``MLFLOW_TRACKING_URI`` is unset
``VAE_OPTUNA_DIR``     studies' files: the embedded storage, best configs,       ``./optuna``
                       trial checkpoints, plots
``VAE_OPTUNA_STORAGE`` the default storage URL of sweeps (e.g. PostgreSQL)       ``sqlite:///<VAE_OPTUNA_DIR>/studies.db``
=====================  ========================================================  =======================================

The services' own variables (``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``, ...) are read by MLflow
and Prefect themselves. :func:`current` reads the environment each time it is called, so a
process (or a test) that changes a variable sees the change at the next call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vae.errors import UserError

__all__ = ["Settings", "SettingsError", "current"]


class SettingsError(UserError, ValueError):
    """An environment variable holds a value the project cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """The project's environment, parsed (see the module docstring for each variable)."""

    data_dir: str | None  # None: unset (callers fall back to their own default, ./data for presets)
    cache_dir: Path
    fast_dev_run: int
    mlruns_dir: Path
    optuna_dir: Path
    optuna_storage: str | None


def current(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings that ``environ`` (default ``os.environ``) gives.

    Raises:
        SettingsError: ``VAE_FAST_DEV_RUN`` is set but not a whole number.
    """
    env = os.environ if environ is None else environ
    fast = env.get("VAE_FAST_DEV_RUN", "").strip()
    if fast and not fast.isdigit():
        raise SettingsError(f"VAE_FAST_DEV_RUN: must be a whole number of batches (0 = off), got {fast!r}; "
                            f"unset it for a full run")
    return Settings(
        data_dir=env.get("VAE_DATA_DIR") or None,
        cache_dir=Path(env.get("VAE_CACHE_DIR") or Path.home() / ".cache" / "vae-mlops"),
        fast_dev_run=int(fast or 0),
        mlruns_dir=Path(env.get("VAE_MLRUNS_DIR") or "mlruns").resolve(),
        optuna_dir=Path(env.get("VAE_OPTUNA_DIR") or "optuna").resolve(),
        optuna_storage=env.get("VAE_OPTUNA_STORAGE") or None,
    )
