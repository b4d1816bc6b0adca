"""vae: a convolutional variational autoencoder for MNIST, as a plain PyTorch library.

Modules: ``model`` (VAE), ``losses`` (VAE, β-VAE, β-TC-VAE), ``data`` (in-memory MNIST),
``train`` (VAETrainer), ``sample`` (VAESampler), ``evaluate`` (likelihood, latent health, sample
quality, figures), ``config`` (presets and validation), ``utils`` (device, EMA, checkpoints).
It imports no tracker or orchestrator; ``pipelines/`` and ``tuning/`` attach those from outside.
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
