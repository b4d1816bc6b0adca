"""The VAE as an anomaly detector: per-image scores, an input-complexity correction, AUROC.

- :func:`anomaly_scores`: per-image negative ELBO (and, with ``k``, the IW bound) in nats, computed
  exactly as :func:`vae.evaluate.evaluate` computes its means (same binarisation protocol, same
  batching and seeded noise), so the mean of a score over the test images is ``test/nelbo`` /
  ``test/iw_nll_k{k}``. Higher = less likely under the model = more unusual.
- :func:`complexity_nats` and :func:`complexity_corrected`: likelihoods favour *simple* images
  (a model trained on Fashion-MNIST gives MNIST digits, mostly black, a higher likelihood than
  its own data: Nalisnick et al. 2019). Serrà et al. 2020 subtract the image's length under a
  generic compressor: S(x) = NLL(x) − L(x), L in nats from zlib (PNG's deflate) at level 9.
- :func:`auroc`: how well a score separates in-distribution from out-of-distribution images
  (0.5 = chance, 1 = perfect; below 0.5, the score ranks the wrong way).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from vae.data import ImageBatches, Split, eval_split
from vae.likelihood import elbo_and_latents, iw_bound

__all__ = ["anomaly_scores", "auroc", "complexity_corrected", "complexity_nats", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] of shape (N, 1, 28, 28) or (N, 28, 28) -> uint8 (N, 28, 28)."""
    images = images.reshape(-1, images.shape[-2], images.shape[-1])
    return images if images.dtype == torch.uint8 else images.double().mul(255).round().to(torch.uint8)


@torch.no_grad()
def anomaly_scores(model: nn.Module, images: torch.Tensor, loss_type: str = "bce", binarize: str = "none",
                   k: int = 0, seed: int = 0, batch_size: int = 500, iw_chunk: int = 1024,
                   complexity: bool = True) -> dict[str, torch.Tensor]:
    """Per-image scores in nats (β = 1), float64 on the CPU, shape (N,) each.

    Args:
        images: uint8 (N, 28, 28) as the data loader gives them (floats in [0, 1] are rounded to
            the 256 grey levels first, as the training images were stored).
        loss_type, binarize: the model's decoder and data protocol (its config's
            ``reconstruction_loss_type`` and ``binarize``): binarised protocols score one seeded
            Bernoulli draw of the images, as the evaluation does.
        k: importance samples of the IW bound (0: the negative ELBO only).
        seed, batch_size, iw_chunk: as :func:`vae.evaluate.evaluate` (its defaults), whose figures
            these equal on the same images.
        complexity: also ``complexity_corrected`` (:func:`complexity_corrected` of the tightest
            bound computed: ``iw_bound`` when k > 0, else ``nelbo``).
    Returns:
        ``nelbo``, ``recon``, ``kl``, when k > 0 ``iw_bound``, with ``complexity`` ``complexity_corrected``.
    """
    device = next(model.parameters()).device
    images = to_uint8(images)
    split = eval_split(Split(images, torch.zeros(len(images), dtype=torch.long)), binarize, seed)
    batches = ImageBatches(split, batch_size, shuffle=False, device=device)
    stats = elbo_and_latents(model, batches, loss_type, seed)
    out = {"nelbo": (stats["recon"] + stats["kl"]).double(), "recon": stats["recon"].double(),
           "kl": stats["kl"].double()}
    if k > 0:
        out["iw_bound"] = iw_bound(model, batches, k, loss_type, seed, iw_chunk)
    if complexity:
        out["complexity_corrected"] = complexity_corrected(out.get("iw_bound", out["nelbo"]), images)
    return out


def complexity_nats(images: torch.Tensor, level: int = 9) -> torch.Tensor:
    """Each image's length under zlib (deflate, as in PNG) in nats: 8 ln 2 per compressed byte.

    Args:
        images: uint8 (N, 28, 28) (floats in [0, 1] are rounded to grey levels first).
    Returns:
        float64 (N,).
    """
    raw = to_uint8(images).contiguous().numpy()
    return torch.tensor([8 * math.log(2) * len(zlib.compress(im.tobytes(), level)) for im in raw],
                        dtype=torch.float64)


def complexity_corrected(nll: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """S(x) = NLL(x) − L(x) in nats (Serrà et al. 2020): the likelihood's surprise beyond what a
    generic compressor already finds in the image. Higher = more unusual."""
    return nll.double() - complexity_nats(images)


def auroc(inliers: torch.Tensor, outliers: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for ``outliers``: the probability
    that a random outlier scores above a random inlier (ties count half; Mann-Whitney U)."""
    if len(inliers) == 0 or len(outliers) == 0:
        raise ValueError("auroc needs at least one inlier and one outlier score")
    scores = torch.cat([inliers.double(), outliers.double()])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average ranks over ties.
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_in, n_out = len(inliers), len(outliers)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))
