"""Sampling from a trained VAE: prior samples, latent grids, traversals, interpolations.

The sampler takes a checkpoint, rebuilds the model from the config stored in it (EMA weights
when present) and draws from the prior; it never trains or parses training configs.

Command line: ``python -m vae.sample --model_path checkpoints/my_vae/best_model.pth --output_dir samples``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __name__ == "__main__" and not __package__:  # `python vae/sample.py` puts vae/ itself on sys.path:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead, so `import vae` works

import torch

from vae.checkpoint import load_model
from vae.cli import run_cli
from vae.device import get_device
from vae.figures import save_image_grid


class VAESampler:
    """Generate images from a trained VAE checkpoint.

    Args:
        model_path: a ``best_model.pth`` / ``last.pth`` written by the trainer.
        device: 'auto', 'cpu', 'cuda' or 'mps'.
        seed: seed of the sampler's own generator (results are reproducible per sampler).
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", seed: int = 0):
        self.device = get_device(device)
        self.model, self.checkpoint = load_model(model_path, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, latent_dim) -> images (N, C, H, W) in [0, 1], on the CPU."""
        return self.model.decode(z.to(self.device)).cpu()

    def sample_random(self, num_samples: int = 16) -> torch.Tensor:
        """Images decoded from z ~ N(0, I)."""
        return self.decode(self._randn(num_samples, self.latent_dim))

    def generate_latent_grid(self, num_samples: int = 8, dims: tuple[int, int] = (0, 1),
                             latent_range: tuple[float, float] = (-3.0, 3.0)) -> torch.Tensor:
        """A num_samples × num_samples grid varying two latent dimensions, the others at 0."""
        if self.latent_dim < 2:
            raise ValueError("a latent grid needs latent_dim >= 2")
        values = torch.linspace(latent_range[0], latent_range[1], num_samples)
        z = torch.zeros(num_samples * num_samples, self.latent_dim)
        rows, cols = torch.meshgrid(values.flip(0), values, indexing="ij")  # top row = high values
        z[:, dims[0]], z[:, dims[1]] = cols.reshape(-1), rows.reshape(-1)
        return self.decode(z)

    def latent_traversal(self, dims: Sequence[int] | None = None, num_steps: int = 10,
                         latent_range: tuple[float, float] = (-3.0, 3.0),
                         base_z: torch.Tensor | None = None) -> torch.Tensor:
        """For each dim in ``dims`` (default the first ten), vary it over the range from ``base_z``.

        Returns (len(dims) * num_steps, C, H, W): one row per dimension.
        """
        dims = list(dims) if dims is not None else list(range(min(10, self.latent_dim)))
        base = base_z.reshape(1, -1).cpu() if base_z is not None else torch.zeros(1, self.latent_dim)
        values = torch.linspace(latent_range[0], latent_range[1], num_steps)
        z = base.repeat(len(dims) * num_steps, 1)
        for row, d in enumerate(dims):
            z[row * num_steps:(row + 1) * num_steps, d] = values
        return self.decode(z)

    def interpolate_latent(self, z1: torch.Tensor, z2: torch.Tensor, num_steps: int = 10,
                           method: str = "linear") -> torch.Tensor:
        """Images along the path from z1 to z2 (linear, or 'slerp' for prior-typical norms)."""
        z1, z2 = z1.reshape(1, -1).cpu().float(), z2.reshape(1, -1).cpu().float()
        t = torch.linspace(0, 1, num_steps).unsqueeze(1)
        if method == "slerp":
            omega = torch.acos((z1 / z1.norm() * z2 / z2.norm()).sum().clamp(-1, 1))
            if omega.abs() < 1e-6:
                z = (1 - t) * z1 + t * z2
            else:
                z = (torch.sin((1 - t) * omega) * z1 + torch.sin(t * omega) * z2) / torch.sin(omega)
        elif method == "linear":
            z = (1 - t) * z1 + t * z2
        else:
            raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image: x (N, C, H, W) in [0, 1] -> reconstructions."""
        mu, _ = self.model.encode(x.to(self.device).float())
        return self.decode(mu)

    @staticmethod
    def save_samples(samples: torch.Tensor, path: str | Path, nrow: int | None = None,
                     title: str | None = None) -> Path:
        """Save images as one titled PNG grid, at least 600 px wide (nrow defaults to a square layout)."""
        return save_image_grid(samples, path, title or f"{len(samples)} decoded images", nrow=nrow)

    def save_latent_grid(self, samples: torch.Tensor, path: str | Path, title: str | None = None) -> Path:
        side = int(round(len(samples) ** 0.5))
        return self.save_samples(samples, path, nrow=side,
                                 title=title or f"latent grid: {side}×{side} images over z0 (across) and z1 (down)")

    def save_interpolation(self, samples: torch.Tensor, path: str | Path, title: str | None = None) -> Path:
        return self.save_samples(samples, path, nrow=len(samples),
                                 title=title or f"interpolation in {len(samples)} steps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-sample", description="Generate images from a trained VAE.")
    p.add_argument("--model_path", required=True, help="checkpoint (best_model.pth or last.pth)")
    p.add_argument("--output_dir", default="samples", help="folder for the PNGs (default: samples)")
    p.add_argument("--num_samples", type=int, default=64, help="random prior samples (default: 64)")
    p.add_argument("--grid_size", type=int, default=10, help="latent grid is grid_size x grid_size (default: 10)")
    p.add_argument("--latent_range_min", type=float, default=-3.0, help="grid/traversal minimum (default: -3)")
    p.add_argument("--latent_range_max", type=float, default=3.0, help="grid/traversal maximum (default: 3)")
    p.add_argument("--num_steps", type=int, default=10, help="steps of traversals and interpolation (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="(default: cpu)")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problems = [f"--{k}: must be >= {lo}, got {getattr(args, k)}" for k, lo in
                (("num_samples", 1), ("grid_size", 2), ("num_steps", 2)) if getattr(args, k) < lo]
    if args.latent_range_min >= args.latent_range_max:
        problems.append("--latent_range_min must be below --latent_range_max")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    sampler = VAESampler(args.model_path, device=args.device, seed=args.seed)
    out, rng = Path(args.output_dir), (args.latent_range_min, args.latent_range_max)
    span, steps = f"{rng[0]:g}…{rng[1]:g}", args.num_steps
    written = [sampler.save_samples(sampler.sample_random(args.num_samples), out / "samples.png",
                                    title=f"{args.num_samples} samples from the prior, z ~ N(0, I)")]
    if sampler.latent_dim >= 2:
        written.append(sampler.save_latent_grid(
            sampler.generate_latent_grid(args.grid_size, latent_range=rng), out / "latent_grid.png",
            title=f"latent grid over z0 (across) and z1 (down), {span}, other dimensions 0"))
    dims = min(10, sampler.latent_dim)
    written.append(sampler.save_samples(
        sampler.latent_traversal(num_steps=steps, latent_range=rng), out / "traversal.png", nrow=steps,
        title=f"latent traversal of dims 0–{dims - 1} (one per row), {span} in {steps} steps, others 0"))
    z1, z2 = sampler._randn(1, sampler.latent_dim), sampler._randn(1, sampler.latent_dim)
    written.append(sampler.save_interpolation(
        sampler.interpolate_latent(z1, z2, steps), out / "interpolation.png",
        title=f"interpolation between two prior draws z₁ → z₂ in {steps} steps"))
    for path in written:
        print(path)
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
