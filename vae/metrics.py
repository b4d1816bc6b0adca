"""What a trained VAE's latents and samples are worth: active units, a linear probe, and a
classifier-based Fréchet distance of its prior samples.

- Active units (Burda et al. 2015): dimension u is active when Cov_x(E_q[z_u|x]) > 0.01.
- :func:`linear_probe`: test accuracy of a logistic regression on the latent means.
- ``fid_cls`` (:func:`sample_quality`): a Fréchet distance on the penultimate features of a small
  MNIST CNN classifier (:mod:`vae.classifier`) between decoded prior samples and real test
  images. It is *not* the Inception FID and is comparable only with itself.
"""

from __future__ import annotations

import torch
from torch import nn

from vae.classifier import predict_features

__all__ = ["ACTIVE_UNIT_THRESHOLD", "active_units", "class_entropy", "encode_means", "frechet_distance",
           "linear_probe", "sample_quality"]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: active when Cov_x(E_q[z_u|x]) exceeds this


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of active dimensions, Cov_x(E_q[z_u|x]) per dimension) from latent means (N, D)."""
    variance = mu.double().var(dim=0, unbiased=True) if len(mu) > 1 else torch.zeros(mu.shape[1], dtype=torch.float64)
    return int((variance > threshold).sum()), variance


@torch.no_grad()
def encode_means(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Posterior means E_q[z|x], (N, D) on the CPU, of uint8 (N, H, W) or float (N, C, H, W) images."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.unsqueeze(1).float().div(255) if x.dtype == torch.uint8 else x.float()
        out.append(model.encode(x.to(device))[0].cpu())
    return torch.cat(out)


def linear_probe(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 l2: float = 1e-4, max_iter: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression fitted on (train_z, train_y).

    Features are standardised with the training mean and deviation; the fit is full-batch L-BFGS
    on the mean cross-entropy + ``l2``·‖W‖², deterministic (zero initialisation).
    """
    train_z, test_z = train_z.double(), test_z.double()
    mean, std = train_z.mean(0), train_z.std(0).clamp_min(1e-6)
    a, b = (train_z - mean) / std, (test_z - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(a.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(a @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(1) == test_y).double().mean())


def frechet_distance(feat1: torch.Tensor, feat2: torch.Tensor) -> float:
    """‖m1 − m2‖² + Tr(S1 + S2 − 2 (S1 S2)^½) between Gaussians fitted to two feature sets (N, F).

    In float64; Tr (S1 S2)^½ = Tr (S1^½ S2 S1^½)^½, with both square roots from symmetric
    eigen-decompositions (negative round-off eigenvalues clamped to 0), which stays stable
    where a general ``sqrtm`` returns complex values.
    """
    f1, f2 = feat1.double(), feat2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    vals, vecs = torch.linalg.eigh(s1)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt)


def class_entropy(logits: torch.Tensor, num_classes: int = 10) -> float:
    """Entropy (nats) of the histogram of predicted classes; ln 10 ≈ 2.303 when all digits are equally common."""
    counts = torch.bincount(logits.argmax(1), minlength=num_classes).double()
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


@torch.no_grad()
def sample_quality(model: nn.Module, classifier: nn.Module, real_images: torch.Tensor, num_samples: int = 10000,
                   seed: int = 0, batch_size: int = 1000) -> dict[str, float]:
    """``fid_cls`` (decoded prior samples vs real images) and ``class_entropy`` of the samples.

    Samples are the decoder's mean images σ(logits) for z ~ N(0, I) (for an autoregressive
    decoder, each pixel's mean given the pixels drawn before it), compared with the real
    grey-level images (uint8 or [0, 1] floats).
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = torch.cat([model.decode(torch.randn(min(batch_size, num_samples - i), model.latent_dim,
                                                  generator=gen, device=device), generator=gen).float().cpu()
                         for i in range(0, num_samples, batch_size)])
    f_fake, logits_fake = predict_features(classifier, samples)
    f_real, _ = predict_features(classifier, real_images)
    return {"fid_cls": frechet_distance(f_real, f_fake), "class_entropy": class_entropy(logits_fake)}
