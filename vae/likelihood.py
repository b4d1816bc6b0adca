"""Likelihood bounds of a trained VAE, per image in nats (β = 1, whatever β trained the model).

- :func:`iw_bound` / :func:`iw_nll`: the importance-weighted bound (Burda et al. 2015)
  −log (1/k) Σ_s p(x, z_s)/q(z_s|x), an upper bound on −log p(x) that tightens as k grows
  (k = 1: a one-sample negative ELBO).
- :func:`elbo_and_latents`: one pass with one z per image: −log p(x|z), the KL and the latent
  means, for the negative ELBO and the latent-health metrics of :mod:`vae.metrics`.

With the Bernoulli (BCE) decoder −log p(x|z) is the binary cross-entropy; with the MSE decoder it
is a Gaussian of unit variance around the decoded image, whose constant puts 392·ln 2π ≈ 720.4
nats under every NLL of 28×28 images (not comparable with published binarised-MNIST numbers).

Whatever prints a likelihood says what it is with :func:`likelihood_unit` (the unit, per decoder),
:func:`likelihood_protocol` (bound, k, images, binarisation) and :func:`likelihood_reference`
(what good looks like), so a number never reaches a user without its meaning.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from vae.losses import gaussian_kl, log_normal, log_px_given_z
from vae.model import VAE

__all__ = ["elbo_and_latents", "iw_bound", "iw_log_weights", "iw_nll", "likelihood_protocol", "likelihood_reference",
           "likelihood_unit"]


@torch.no_grad()
def iw_log_weights(model: nn.Module, x: torch.Tensor, k: int, loss_type: str, chunk: int = 1024,
                   generator: torch.Generator | None = None,
                   tick: Callable[[int], object] | None = None) -> torch.Tensor:
    """log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x), z_s ~ q(z|x), s = 1..k: shape (B, k).

    The k samples are decoded in chunks of at most ``max(chunk, B)`` images per forward pass, so
    memory stays bounded for any k (k = 5,000 included). ``tick(n)`` is called after each chunk
    with the number of (image, sample) pairs it decoded (a progress bar's ``update``).
    """
    mu, log_var = model.encode(x)
    std = torch.exp(0.5 * log_var)
    per_chunk = max(1, chunk // x.shape[0])
    # One (B, k) tensor filled in place: a small tensor kept per pass would be left live between
    # the passes' large buffers, fragmenting the heap that retained_heap keeps (BENCHMARKS.md, "Evaluation memory").
    log_w = torch.empty((x.shape[0], k), device=mu.device, dtype=mu.dtype)
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps  # (n, B, D)
        xs = x.repeat(n, 1, 1, 1)  # repeat tiles: s*B + b
        logits = model.decode_logits(z.reshape(-1, mu.shape[1]), xs)
        log_px = log_px_given_z(logits, xs, loss_type).view(n, -1)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        log_qz = log_normal(z, mu, log_var).sum(-1)
        log_w[:, start:start + n] = (log_px + log_pz - log_qz).T
        if tick is not None:
            tick(n * x.shape[0])
    return log_w


@torch.no_grad()
def iw_bound(model: nn.Module, batches: Iterable, k: int, loss_type: str, seed: int = 0,
             chunk: int = 1024, tick: Callable[[int], object] | None = None) -> torch.Tensor:
    """Per-image importance-weighted bound −log (1/k) Σ_s w_s ≥ −log p(x), nats, shape (N,).

    Computed with log-sum-exp over the k log-weights. ``batches`` yields ``(x, labels)``; ``tick``
    as in :func:`iw_log_weights` (k per image in all).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model.eval()
    out, gen = [], None
    for x, _ in batches:
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        log_w = iw_log_weights(model, x, k, loss_type, chunk, gen, tick)
        out.append((math.log(k) - torch.logsumexp(log_w.double(), dim=1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def iw_nll(model: nn.Module, batches: Iterable, k: int, loss_type: str, seed: int = 0, chunk: int = 1024) -> float:
    """Importance-weighted bound on −log p(x) (Burda et al. 2015), mean nats per image.

    −log p(x) ≤ −log (1/k) Σ_s w_s; k = 1 gives a one-sample negative ELBO. See :func:`iw_bound`.
    """
    bound = iw_bound(model, batches, k, loss_type, seed, chunk)
    return float(bound.mean()) if len(bound) else 0.0


@torch.no_grad()
def elbo_and_latents(model: nn.Module, batches: Iterable, loss_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """One pass with one z per image (fixed noise): per-image −log p(x|z) and KL, latent means and KL per dim.

    Returns (on the CPU): ``recon`` (N,), ``kl`` (N,), ``mu`` (N, D), ``kl_per_dim`` (D,) (mean over
    images), ``labels`` (N,). β = 1; nats for both decoders (see the module docstring).
    """
    model.eval()
    recon, kl, mus, labels, gen = [], [], [], [], None
    for x, y in batches:
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        mu, log_var = model.encode(x)
        z = VAE.reparameterize(mu, log_var, generator=gen)
        recon.append(-log_px_given_z(model.decode_logits(z, x), x, loss_type).cpu())
        kl.append(gaussian_kl(mu, log_var).cpu())
        mus.append(mu.cpu())
        labels.append(y.cpu())
    kl_dims = torch.cat(kl)
    return {"recon": torch.cat(recon), "kl": kl_dims.sum(1), "mu": torch.cat(mus), "kl_per_dim": kl_dims.mean(0),
            "labels": torch.cat(labels)}


# Anchors for :func:`likelihood_reference` (docs/evaluation.md#units-and-protocols, BENCHMARKS.md).
PUBLISHED_VAE_NATS = 86.76  # 1-layer VAE, dynamically binarised MNIST, IW bound (Burda et al. 2015)
BENCHMARK_PRESET_NATS = 79.98  # `benchmark` preset (4-layer head, lr 3e-3, bf16): 58 min on 2 CPU cores, k = 1,000, all 10,000
GAUSSIAN_CONSTANT_NATS = 392 * math.log(2 * math.pi)  # 720.4: the unit-variance Gaussian's share of an NLL


def likelihood_unit(loss_type: str, binarize: str = "none", trainer: bool = False) -> str:
    """The unit of a likelihood (NLL, NELBO, IW bound) under a config's decoder and binarisation.

    Args:
        trainer: a number the trainer logged (``train/*``, ``val/*``) rather than the evaluation
            (``test/*``): for the MSE decoder those are squared errors plus KL, not nats.
    """
    if loss_type == "mse" and trainer:
        return "squared error plus KL per image (the MSE decoder's training loss: not nats, not a likelihood)"
    if loss_type == "mse":
        return (f"nats per image under a unit-variance Gaussian (MSE) decoder, including its "
                f"{GAUSSIAN_CONSTANT_NATS:.1f}-nat constant: not comparable with binarised-MNIST results")
    if binarize in ("static", "dynamic"):
        return f"nats per image, Bernoulli decoder, {binarize}ally binarised images"
    return "nats per image, Bernoulli decoder on grey levels (not binarised: not comparable with published results)"


def likelihood_protocol(loss_type: str, binarize: str, k: int, n_images: int = 0) -> str:
    """How an IW bound was measured: ``IW bound, k=1000, first 500 test images binarised once ...``.

    Args:
        n_images: the first N test images (0 = all).
    """
    images = f"first {n_images:,} test images" if n_images else "all test images"
    drawn = " binarised once with a fixed seed" if binarize in ("static", "dynamic") else ""
    return f"IW bound, k={k:,}, {images}{drawn}; {likelihood_unit(loss_type, binarize)}"


def likelihood_reference(loss_type: str, binarize: str) -> str:
    """What good looks like for a bound under this protocol (lower is always better)."""
    if loss_type == "mse":
        return f"lower is better; {GAUSSIAN_CONSTANT_NATS:.1f} of it is the Gaussian's constant"
    if binarize in ("static", "dynamic"):
        return (f"lower is better; a published 1-layer VAE: {PUBLISHED_VAE_NATS:.1f}; "
                f"--preset benchmark: {BENCHMARK_PRESET_NATS:.2f}")
    return "lower is better"
