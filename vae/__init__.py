"""vae: a convolutional variational autoencoder for MNIST, as a plain PyTorch library.

Start at ``model`` (the VAE, plain torch.nn), ``losses`` (VAE, β-VAE, β-TC-VAE) and ``train``
(``VAETrainer``). Then: ``config`` (presets, validation), ``data`` (in-memory MNIST), ``loop``
(one epoch, one validation pass), ``sample`` (``VAESampler``), ``evaluate`` (every metric, built
from ``likelihood``, ``metrics`` and ``classifier``), ``figures``; the helpers ``checkpoint``,
``optim``, ``ema``, ``device``, ``files``, ``settings`` (every environment variable), ``cli``
and ``errors``; ``autoregressive`` (the autoregressive decoder head); ``fast`` (the CPU fast
path, applied by ``fast.accelerate``). It imports no tracker or orchestrator; ``pipelines/`` and
``tuning/`` attach those from outside.

The names below (``vae.VAE``, ``vae.get_default_config``, ...) load their module on first use, so
``import vae.config`` or ``vae.settings`` (what the light commands need: ``pipelines.sync``,
``--show-best``, every ``--help``) does not import torch, 2 s of every start.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "VAE": "vae.model", "VAELoss": "vae.losses", "BetaVAELoss": "vae.losses", "DisentangledVAELoss": "vae.losses",
    "ConfigError": "vae.config", "validate_config": "vae.config", "get_default_config": "vae.config",
    "get_beta_vae_config": "vae.config", "get_disentangled_config": "vae.config", "get_benchmark_config": "vae.config",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
