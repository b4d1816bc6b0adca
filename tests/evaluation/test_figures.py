"""Figures: every one written as a non-empty PNG; loss curves only with a history."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from vae.figures import _grid_image, loss_curves_figure, plot_loss_curves, save_image_grid, write_figures

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


def test_loss_curves_tick_whole_epochs_only():
    history = [{"epoch": e, "train/loss": 200.0 - e, "val/nelbo": 190.0 - e, "train/beta": 1.0} for e in (1, 2, 3)]
    fig = loss_curves_figure(history)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_save_image_grid_upscales_to_a_readable_width_and_titles_it(tmp_path):
    images = torch.zeros(16, 1, 28, 28)
    images[:, :, 10:18, 10:18] = 1.0  # a white square in each cell
    path = save_image_grid(images, tmp_path / "grid.png", title="16 samples from the prior")
    png = Image.open(path)
    assert png.size[0] == 122 * 5 >= 600  # 4 cells of 28 px + 2 px padding, upscaled 5x
    assert png.text["Title"] == "16 samples from the prior"
    pixels = np.asarray(png.convert("L"))
    title_rows = pixels.shape[0] - 122 * 5
    assert title_rows > 0 and pixels[:title_rows].min() < 128, "no title text above the grid"
    # nearest-neighbour: a 5x5 block per source pixel, no blur (only black and white in the grid)
    grid = pixels[title_rows:]
    assert set(np.unique(grid)) <= {0, 255}


@pytest.mark.parametrize("n, nrow, padding", [(16, 4, 2), (7, 3, 2), (5, 8, 0), (1, 4, 2), (12, 5, 1)])
def test_the_grid_is_torchvisions_make_grid(n, nrow, padding):
    """The figures lay images out as torchvision's ``make_grid`` does (which they no longer import)."""
    from torchvision.utils import make_grid

    images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    want = make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)[0]
    assert torch.equal(_grid_image(images, nrow, padding), want)
