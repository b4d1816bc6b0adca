"""Evaluation: likelihood bounds, latent health and sample quality, as pure library code."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from vae.losses import log_normal, log_px_given_z


@torch.no_grad()
def iw_log_weights(model: nn.Module, x: torch.Tensor, k: int, loss_type: str, chunk: int = 256,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x) for s = 1..k, shape (B, k), chunked over k."""
    mu, log_var = model.encode(x)
    out = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device)
        z = mu + torch.exp(0.5 * log_var) * eps  # (n, B, D)
        logits = model.decode_logits(z.reshape(-1, mu.shape[1]))
        log_px = log_px_given_z(logits, x.repeat(n, 1, 1, 1), loss_type).view(n, -1)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        log_qz = log_normal(z, mu, log_var).sum(-1)
        out.append((log_px + log_pz - log_qz).T)
    return torch.cat(out, dim=1)


@torch.no_grad()
def iw_nll(model: nn.Module, batches: Iterable, k: int, loss_type: str, seed: int = 0, chunk: int = 256) -> float:
    """Importance-weighted bound on −log p(x) (Burda et al. 2015), nats per image.

    −log p(x) ≤ −log (1/k) Σ_s w_s, computed with log-sum-exp; k = 1 gives the negative ELBO.
    """
    model.eval()
    total, count, gen = 0.0, 0, None
    for x, _ in batches:
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        log_w = iw_log_weights(model, x, k, loss_type, chunk, gen)
        total += float(-(torch.logsumexp(log_w, dim=1) - math.log(k)).sum())
        count += len(x)
    return total / max(count, 1)
