"""vae: a convolutional variational autoencoder for MNIST, as a plain PyTorch library.

Start at ``model`` (the VAE, plain torch.nn), ``losses`` (VAE, β-VAE, β-TC-VAE) and ``train``
(``VAETrainer``). Then: ``config`` (presets, validation), ``data`` (in-memory MNIST), ``loop``
(one epoch, one validation pass), ``sample`` (``VAESampler``), ``evaluate`` (every metric, built
from ``likelihood``, ``metrics`` and ``classifier``), ``figures``; the helpers ``checkpoint``,
``optim``, ``ema``, ``device``, ``files``, ``settings`` (every environment variable), ``cli``
and ``errors``; ``autoregressive`` (the autoregressive decoder head); ``fast`` (the CPU fast
path, applied by ``fast.accelerate``). It imports no tracker or orchestrator; ``pipelines/`` and
``tuning/`` attach those from outside.
"""

from vae.config import (ConfigError, get_benchmark_config, get_beta_vae_config, get_default_config,
                        get_disentangled_config, validate_config)
from vae.losses import BetaVAELoss, DisentangledVAELoss, VAELoss
from vae.model import VAE

__all__ = [
    "VAE", "VAELoss", "BetaVAELoss", "DisentangledVAELoss", "ConfigError", "validate_config",
    "get_default_config", "get_beta_vae_config", "get_disentangled_config", "get_benchmark_config",
]
__version__ = "0.1.0"
