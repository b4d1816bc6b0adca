"""Fixtures of the library tests: one trained tiny checkpoint shared by the sampler, example and
README tests, and a tiny dataset large enough for the presets' default 5,000-image validation split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import write_idx_dataset


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
    spinning OpenMP threads made a 1 s training take 30-60 s. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_train_config(data_dir: Path, checkpoint_dir: Path, **overrides) -> dict:
    """The shared tiny config (as ``tiny_config``), for fixtures wider than one test."""
    from vae.config import get_default_config

    cfg = get_default_config()
    cfg.update(data_dir=str(data_dir), checkpoint_dir=str(checkpoint_dir), experiment_name="tiny",
               hidden_dims=[8, 16], latent_dim=4, batch_size=50, num_epochs=1, val_size=100, progress=False,
               sample_every=1, ema_decay=0.9, learning_rate=3e-3, log_every=5)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tiny_data_dir) -> Path:
    """best_model.pth of a tiny VAE trained for one epoch on the tiny data (latent_dim 4)."""
    from vae.train import VAETrainer

    root = tmp_path_factory.mktemp("trained")
    result = VAETrainer(tiny_train_config(tiny_data_dir, root / "checkpoints")).train()
    return Path(result["best_model_path"])


@pytest.fixture(scope="session")
def preset_data_dir(tmp_path_factory) -> Path:
    """A tiny MNIST with 5,200 training images: the presets' default val_size (5,000) fits."""
    return write_idx_dataset(tmp_path_factory.mktemp("preset_mnist"), n_train=5200, n_test=100)
