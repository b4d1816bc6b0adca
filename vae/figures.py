"""Figures of a trained VAE as PNG files: one function per figure, :func:`write_figures` for all.

Every figure has a title and labelled axes. Matplotlib is used through ``Figure`` objects with
the Agg canvas only (no pyplot, no display, no global backend switch), so this is safe in
servers, workers and tests.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from vae.data import ImageBatches, ImageData, Split, eval_split
from vae.files import atomic_write
from vae.likelihood import elbo_and_latents
from vae.metrics import ACTIVE_UNIT_THRESHOLD, active_units

__all__ = ["loss_curves_figure", "plot_interpolations", "plot_kl_per_dim", "plot_latent_grid", "plot_latent_pca",
           "plot_loss_curves", "plot_prior_samples", "plot_reconstructions", "plot_score_histograms",
           "plot_time_to_quality", "plot_traversals", "save_image_grid",
           "write_figures"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png")
    return path


def _grid_image(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> one (H', W') grey image with white padding: ``nrow`` images per
    row, ``padding`` pixels around each (torchvision's ``make_grid`` layout, without importing it)."""
    images = images.float().cpu().clamp(0, 1)[:, 0]
    if len(images) == 1:
        return images[0]
    n, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = images.new_ones(rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i, image in enumerate(images):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[top:top + h, left:left + w] = image
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, title: str, nrow: int | None = None,
                    padding: int = 2, min_width: int = 600, dpi: int = 100) -> Path:
    """Images as one titled PNG grid, at least ``min_width`` pixels wide: MNIST's 28-pixel digits
    saved 1:1 make a 300-pixel thumbnail nobody can read, so each pixel becomes a square block
    (nearest-neighbour, an integer factor: no blur) and a title says what the grid shows.

    Args:
        images: (N, 1, H, W) in [0, 1].
        title: the heading drawn above the grid; also stored as the PNG's ``Title`` text chunk
            (``PIL.Image.open(path).text["Title"]``).
        nrow: images per row (default: a square layout).
    Returns:
        the path written.
    """
    grid = _grid_image(images, nrow or max(1, int(len(images) ** 0.5)), padding)
    height, width = grid.shape
    scale = max(1, math.ceil(min_width / width))
    lines = textwrap.wrap(title, max(20, width * scale // 8)) or [""]
    title_px = 10 + 20 * len(lines)
    fig = Figure(figsize=(width * scale / dpi, (height * scale + title_px) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, height * scale / (height * scale + title_px)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5, 1 - 5 / (height * scale + title_px), "\n".join(lines), ha="center", va="top", fontsize=12)
    path = Path(path)
    with atomic_write(path) as f:  # a full disk: a StorageError naming the file, never half a PNG
        fig.savefig(f, format="png", dpi=dpi, metadata={"Title": title})
    return path


@torch.no_grad()
def _decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model.decode(z.to(next(model.parameters()).device)).float().cpu()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).float().div(255) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def plot_reconstructions(model: nn.Module, images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Test images (left) beside the decoded posterior means of the same images (right)."""
    model.eval()
    x = _as_float(images).to(next(model.parameters()).device)
    recon = _decode(model, model.encode(x)[0])
    rows = -(-len(x) // nrow)
    fig = _figure(10, 1.2 + 5.0 * rows / nrow)
    axes = fig.subplots(1, 2)
    for ax, imgs, name in ((axes[0], x.cpu(), "originals"), (axes[1], recon, "reconstructions (decoded E[z|x])")):
        ax.imshow(_grid_image(imgs, nrow), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xlabel("image (column)")
        ax.set_ylabel("image (row)")
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Reconstructions beside originals (same positions)")
    return _save(fig, path)


def plot_prior_samples(model: nn.Module, path: str | Path, num_samples: int = 64, seed: int = 0) -> Path:
    """Decoded mean images of z ~ N(0, I)."""
    z = torch.randn(num_samples, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    nrow = max(1, int(num_samples ** 0.5))
    fig = _figure(6, 6.4)
    ax = fig.subplots()
    ax.imshow(_grid_image(_decode(model, z), nrow), cmap="gray", vmin=0, vmax=1)
    means = "pixel means given the pixels drawn before" if getattr(model, "autoregressive", False) else "decoder means"
    ax.set_title(f"{num_samples} prior samples, z ~ N(0, I) ({means})")
    ax.set_xlabel("sample (column)")
    ax.set_ylabel("sample (row)")
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def plot_latent_grid(model: nn.Module, path: str | Path, dims: tuple[int, int] = (0, 1), steps: int = 15,
                     latent_range: tuple[float, float] = (-3.0, 3.0)) -> Path:
    """Decoded images over a grid of two latent dimensions, all others at 0 (the prior mean)."""
    lo, hi = latent_range
    values = torch.linspace(lo, hi, steps)
    z = torch.zeros(steps * steps, model.latent_dim)
    rows, cols = torch.meshgrid(values.flip(0), values, indexing="ij")  # top row = high values
    z[:, dims[0]] = cols.reshape(-1)
    if model.latent_dim > 1:
        z[:, dims[1]] = rows.reshape(-1)
    fig = _figure(7, 7.4)
    ax = fig.subplots()
    ax.imshow(_grid_image(_decode(model, z), steps, padding=0), cmap="gray", vmin=0, vmax=1,
              extent=(lo, hi, lo, hi))
    ax.set_title(f"2-D latent grid over z{dims[0]} and z{dims[1]} (other dimensions 0)")
    ax.set_xlabel(f"z{dims[0]}")
    ax.set_ylabel(f"z{dims[1]}")
    return _save(fig, path)


def plot_traversals(model: nn.Module, path: str | Path, dims: Sequence[int], steps: int = 11,
                    latent_range: tuple[float, float] = (-3.0, 3.0), base_z: torch.Tensor | None = None,
                    kl_per_dim: torch.Tensor | None = None) -> Path:
    """One row per dimension in ``dims``: that coordinate swept over the range, the others at ``base_z``."""
    dims = list(dims)
    base = base_z.reshape(1, -1).cpu().float() if base_z is not None else torch.zeros(1, model.latent_dim)
    values = torch.linspace(latent_range[0], latent_range[1], steps)
    z = base.repeat(len(dims) * steps, 1)
    for row, d in enumerate(dims):
        z[row * steps:(row + 1) * steps, d] = values
    fig = _figure(1.0 + 0.75 * steps, 0.8 + 0.75 * len(dims))
    ax = fig.subplots()
    ax.imshow(_grid_image(_decode(model, z), steps, padding=0), cmap="gray", vmin=0, vmax=1)
    size = model.image_size
    ax.set_xticks([size * (i + 0.5) for i in range(steps)], [f"{v:.1f}" for v in values.tolist()])
    labels = [f"z{d}" + (f" (KL {float(kl_per_dim[d]):.2f})" if kl_per_dim is not None else "") for d in dims]
    ax.set_yticks([size * (i + 0.5) for i in range(len(dims))], labels)
    ax.set_title("Latent traversals of the most active dimensions")
    ax.set_xlabel("value of the traversed dimension")
    ax.set_ylabel("dimension")
    return _save(fig, path)


@torch.no_grad()
def plot_interpolations(model: nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                        steps: int = 10) -> Path:
    """Rows of decoded linear interpolations between the posterior means of pairs of test images."""
    model.eval()
    device = next(model.parameters()).device
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    rows = []
    for a, b in pairs:
        mu = model.encode(torch.stack([_as_float(a.unsqueeze(0))[0], _as_float(b.unsqueeze(0))[0]]).to(device))[0].cpu()
        rows.append(_decode(model, (1 - t) * mu[0] + t * mu[1]))
    fig = _figure(1.0 + 0.75 * steps, 0.8 + 0.75 * len(pairs))
    ax = fig.subplots()
    ax.imshow(_grid_image(torch.cat(rows), steps, padding=0), cmap="gray", vmin=0, vmax=1)
    size = model.image_size
    ax.set_xticks([size * (i + 0.5) for i in range(steps)], [f"{v:.2f}" for v in t.squeeze(1).tolist()])
    ax.set_yticks([size * (i + 0.5) for i in range(len(pairs))], [f"pair {i + 1}" for i in range(len(pairs))])
    ax.set_title("Interpolations between encoded test images: z = (1 − t)·μ₁ + t·μ₂")
    ax.set_xlabel("t")
    ax.set_ylabel("image pair")
    return _save(fig, path)


_CURVES = (("loss", (("train/loss", "train (training objective)"), ("val/loss", "validation (training objective)"),
                     ("val/nelbo", "validation NELBO (β = 1)")), "nats per image"),
           ("reconstruction", (("train/recon", "train"), ("val/recon", "validation")), "−log p(x|z) per image"),
           ("KL divergence", (("train/kl", "train"), ("val/kl", "validation")), "KL(q(z|x) ‖ p(z)), nats"),
           ("β (KL weight)", (("train/beta", "β at epoch end"),), "β"))


def plot_loss_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Train/validation loss, reconstruction, KL and β over epochs from a trainer history."""
    return _save(loss_curves_figure(history), path)


def loss_curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The figure :func:`plot_loss_curves` saves: four panels over whole epochs."""
    fig = _figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for ax, (title, series, ylabel) in zip(axes, _CURVES):
        for key, label in series:
            points = [(e, row[key]) for e, row in zip(epochs, history) if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves ({len(history)} epochs)")
    return fig


def plot_score_histograms(groups: Mapping[str, torch.Tensor], path: str | Path, title: str,
                          xlabel: str = "score (nats per image; higher = more unusual)") -> Path:
    """Overlaid histograms of per-image scores, one per group (in- vs out-of-distribution)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    values = torch.cat([g.double().flatten() for g in groups.values()])
    bins = torch.linspace(float(values.min()), float(values.max()) + 1e-9, 61).numpy()
    for name, group in groups.items():
        ax.hist(group.double().numpy(), bins=bins, alpha=0.55, label=f"{name} ({len(group):,})")
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    ax.legend()
    return _save(fig, path)


def plot_time_to_quality(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                         title: str = "Test IW bound against training time") -> Path:
    """One line per run: rows with ``minutes``, ``iw_nll`` and ``iw_nll_se`` (nats), e.g. the
    ``curve`` of ``benchmarks/quality.py``'s results; the legend names each run's k and images."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for name, rows in curves.items():
        if rows:
            label = f"{name} (k = {rows[0]['k']:,}, {rows[0]['images']:,} test images)"
            ax.errorbar([r["minutes"] for r in rows], [r["iw_nll"] for r in rows],
                        yerr=[r["iw_nll_se"] for r in rows], marker="o", markersize=3, capsize=2, label=label)
    ax.set(title=title, xlabel="training wall-clock time, minutes", ylabel="−log p(x) bound, nats per image")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_latent_pca(mu: torch.Tensor, labels: torch.Tensor, path: str | Path) -> Path:
    """Test-image latent means projected on their first two principal components, coloured by digit."""
    centred = mu.double() - mu.double().mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ v[:2].T
    if proj.shape[1] == 1:
        proj = torch.cat([proj, torch.zeros_like(proj)], dim=1)
    explained = (s[:2] ** 2 / (s ** 2).sum().clamp_min(1e-12)).tolist() + [0.0]
    fig = _figure(7.5, 6.5)
    ax = fig.subplots()
    scatter = ax.scatter(proj[:, 0], proj[:, 1], c=labels.numpy(), cmap="tab10", vmin=-0.5, vmax=9.5, s=4, alpha=0.7)
    fig.colorbar(scatter, ax=ax, ticks=range(10), label="digit")
    ax.set_title(f"Latent means of {len(mu)} test images, PCA")
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
    return _save(fig, path)


def plot_kl_per_dim(kl_per_dim: torch.Tensor, variance: torch.Tensor, path: str | Path,
                    threshold: float = ACTIVE_UNIT_THRESHOLD) -> Path:
    """KL per latent dimension as bars, active units (Cov_x E[z_u|x] > threshold) highlighted."""
    active = (variance > threshold).tolist()
    fig = _figure(max(6.0, 0.12 * len(kl_per_dim) + 2), 4.5)
    ax = fig.subplots()
    colors = ["tab:blue" if a else "tab:gray" for a in active]
    ax.bar(range(len(kl_per_dim)), kl_per_dim.tolist(), color=colors)
    ax.set_title(f"KL per latent dimension: {sum(active)} of {len(active)} active "
                 f"(blue: Cov_x(E[z|x]) > {threshold})")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("mean KL over test images (nats)")
    return _save(fig, path)


def write_figures(model: nn.Module, data: ImageData | Split, history: Sequence[Mapping[str, Any]] | None,
                  out_dir: str | Path, *, loss_type: str = "bce", binarize: str = "none", seed: int = 0,
                  max_images: int = 2000, num_traversal_dims: int = 8) -> dict[str, Path]:
    """Write every figure into ``out_dir``; returns {name: path}.

    Args:
        data: an ImageData (its test images are used) or a Split.
        history: the trainer's per-epoch metric dicts (``result['history']`` / metrics.jsonl);
            the loss-curve figure is skipped when it is empty or None.
        max_images: test images encoded for the PCA, the KL bars and the active units.
    """
    out = Path(out_dir)
    split = Split(data.test_images, data.test_labels) if isinstance(data, ImageData) else data
    device = next(model.parameters()).device
    was_training = model.training
    split = eval_split(split, binarize, seed, max_images)
    stats = elbo_and_latents(model, ImageBatches(split, 500, shuffle=False, device=device), loss_type, seed)
    _, variance = active_units(stats["mu"])
    order = torch.argsort(stats["kl_per_dim"], descending=True).tolist()
    grid_dims = (order[0], order[1] if len(order) > 1 else order[0])
    n_pairs = min(6, len(split) // 2)
    pairs = [(split.images[2 * i], split.images[2 * i + 1]) for i in range(n_pairs)]
    paths = {
        "reconstructions": plot_reconstructions(model, split.images[:32], out / "reconstructions.png"),
        "prior_samples": plot_prior_samples(model, out / "prior_samples.png", seed=seed),
        "latent_grid": plot_latent_grid(model, out / "latent_grid.png", dims=grid_dims),
        "traversals": plot_traversals(model, out / "traversals.png", order[:num_traversal_dims],
                                      kl_per_dim=stats["kl_per_dim"]),
        "interpolations": plot_interpolations(model, pairs, out / "interpolations.png"),
        "latent_pca": plot_latent_pca(stats["mu"], stats["labels"], out / "latent_pca.png"),
        "kl_per_dim": plot_kl_per_dim(stats["kl_per_dim"], variance, out / "kl_per_dim.png"),
    }
    if history:
        paths["loss_curves"] = plot_loss_curves(history, out / "loss_curves.png")
    model.train(was_training)
    return paths
