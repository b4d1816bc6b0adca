"""Fixtures for the evaluation tests: the tiny dataset in memory, one tiny trained run, a tiny classifier."""

from __future__ import annotations

import pytest
import torch

from vae.classifier import train_classifier
from vae.data import load_dataset


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine extra threads mostly spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def tiny_data(tiny_data_dir):
    """The shared tiny dataset (600 train, 200 test images) as an ImageData."""
    return load_dataset(tiny_data_dir)


@pytest.fixture(scope="package")
def tiny_run(tiny_data_dir, tmp_path_factory) -> dict:
    """One tiny BCE VAE trained for 4 epochs on the tiny data: the trainer's result dict."""
    from vae.config import get_default_config
    from vae.train import VAETrainer

    cfg = get_default_config()
    cfg.update(data_dir=str(tiny_data_dir), checkpoint_dir=str(tmp_path_factory.mktemp("eval_ckpt")),
               experiment_name="tiny_eval", hidden_dims=[8, 16], latent_dim=4, batch_size=50, num_epochs=4,
               val_size=100, progress=False, sample_every=0, ema_decay=0.0, learning_rate=5e-3,
               reconstruction_loss_type="bce", device="cpu")
    return VAETrainer(cfg, overwrite=True).train()


@pytest.fixture(scope="package")
def tiny_model(tiny_run):
    """The tiny run's best model, loaded back from its checkpoint (eval mode, CPU)."""
    from vae.utils import load_model

    return load_model(tiny_run["best_model_path"])[0]


@pytest.fixture(scope="package")
def tiny_classifier(tiny_data):
    """A tiny digit classifier (width 8, 16 features) trained for 3 epochs on the tiny training images."""
    return train_classifier(tiny_data.train_images, tiny_data.train_labels, width=8, feature_dim=16, epochs=3,
                            batch_size=32, learning_rate=5e-3)


@pytest.fixture
def make_vae():
    """Factory of small untrained VAEs in eval mode with a fixed initialisation."""
    from vae.model import VAE

    def make(latent_dim: int = 2, hidden_dims=(4, 8), seed: int = 0) -> VAE:
        torch.manual_seed(seed)
        return VAE(1, list(hidden_dims), latent_dim).eval()

    return make
