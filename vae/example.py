"""Usage examples that run in seconds: build a model, train a tiny one, sample from it."""

from __future__ import annotations

from pathlib import Path

import torch

from vae.config import get_small_config
from vae.model import VAE
from vae.sample import VAESampler
from vae.train import VAETrainer


def test_vae_model() -> VAE:
    """Build the default VAE, run a batch through it and check every shape. Returns the model."""
    model = VAE()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        recon, mu, log_var = model(x)
    assert recon.shape == x.shape, recon.shape
    assert mu.shape == log_var.shape == (4, model.latent_dim)
    assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    assert model.sample(3).shape == (3, 1, 28, 28)
    params = sum(p.numel() for p in model.parameters())
    print(f"VAE ok: {params:,} parameters, latent_dim={model.latent_dim}, output {tuple(recon.shape)}")
    return model


def train_vae_example(num_epochs: int = 1, data_dir: str | None = None, checkpoint_dir: str = "checkpoints",
                      max_train_samples: int = 3000) -> str:
    """Train a small VAE for a few seconds (a subset of MNIST). Returns the best model's path."""
    config = get_small_config()
    config.update(experiment_name="example_vae", num_epochs=num_epochs, max_train_samples=max_train_samples,
                  val_size=min(500, max_train_samples // 5), checkpoint_dir=checkpoint_dir)
    if data_dir is not None:
        config["data_dir"] = data_dir
    result = VAETrainer(config, overwrite=True).train()
    print(f"trained {result['epochs_completed']} epoch(s): val/nelbo {result['best_val_nelbo']:.2f}; "
          f"model at {result['best_model_path']}")
    return result["best_model_path"]


def sample_vae_example(model_path: str, output_dir: str = "samples/example") -> list[Path]:
    """Write random samples, a latent grid and an interpolation from a trained model."""
    sampler = VAESampler(model_path)
    out = Path(output_dir)
    z1, z2 = torch.randn(1, sampler.latent_dim), torch.randn(1, sampler.latent_dim)
    written = [
        sampler.save_samples(sampler.sample_random(16), out / "samples.png"),
        sampler.save_latent_grid(sampler.generate_latent_grid(num_samples=8), out / "latent_grid.png"),
        sampler.save_interpolation(sampler.interpolate_latent(z1, z2, 10), out / "interpolation.png"),
    ]
    print("wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    test_vae_model()
    sample_vae_example(train_vae_example())
