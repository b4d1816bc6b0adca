"""vae.example: the three usage examples the seed README starts with."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vae.example import sample_vae_example, test_vae_model as build_and_check_model, train_vae_example
from vae.model import VAE


def test_test_vae_model_builds_the_default_model(capsys):
    model = build_and_check_model()
    assert isinstance(model, VAE) and model.latent_dim == 128
    assert "VAE ok" in capsys.readouterr().out


def test_train_vae_example_returns_an_existing_checkpoint(tiny_data_dir, tmp_path):
    path = train_vae_example(data_dir=str(tiny_data_dir), checkpoint_dir=str(tmp_path / "checkpoints"))
    assert Path(path).is_file() and Path(path).name == "best_model.pth"
    assert Path(path).parent == tmp_path / "checkpoints" / "example_vae"


def test_sample_vae_example_writes_the_pngs(trained_checkpoint, tmp_path):
    written = sample_vae_example(str(trained_checkpoint), output_dir=str(tmp_path / "out"))
    assert {p.name for p in written} == {"samples.png", "latent_grid.png", "interpolation.png"}
    for p in written:
        assert Image.open(p).size[0] > 28
