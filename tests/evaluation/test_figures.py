"""Figures: every one written as a non-empty PNG; loss curves only with a history."""

from __future__ import annotations

import matplotlib.image
import numpy as np

from vae.figures import plot_loss_curves, write_figures

ALL = {"reconstructions", "prior_samples", "latent_grid", "traversals", "interpolations", "latent_pca",
       "kl_per_dim", "loss_curves"}


def test_write_figures_writes_every_figure_as_a_nonblank_png(tiny_model, tiny_data, tiny_run, tmp_path):
    paths = write_figures(tiny_model, tiny_data, tiny_run["history"], tmp_path, binarize="dynamic", max_images=100)
    assert set(paths) == ALL
    for name, path in paths.items():
        pixels = matplotlib.image.imread(path)
        assert path.parent == tmp_path and pixels.shape[0] > 100, name
        assert np.ptp(pixels[..., :3]) > 0.5, f"{name} is blank"


def test_write_figures_skips_loss_curves_without_a_history(tiny_model, tiny_data, tmp_path):
    paths = write_figures(tiny_model, tiny_data, None, tmp_path, max_images=50)
    assert set(paths) == ALL - {"loss_curves"}


def test_loss_curves_plot_a_partial_history(tmp_path):
    history = [{"epoch": 1, "train/loss": 200.0, "val/nelbo": 190.0}, {"epoch": 2, "train/loss": 150.0}]
    path = plot_loss_curves(history, tmp_path / "curves.png")
    assert path.stat().st_size > 1000
