"""Evaluation: likelihood bounds, latent health and sample quality, as pure library code.

:func:`evaluate` returns one flat dict of floats with stable names (``test/nelbo``,
``test/iw_nll_k1000``, ``test/active_units``, ``test/probe_acc``, ``test/fid_cls``, ...); it
logs nothing anywhere: ``pipelines/`` sends the dict to MLflow.

Units and protocols:

- Likelihoods are nats per image with β = 1, whatever β trained the model. With the Bernoulli
  (BCE) decoder, −log p(x|z) is the binary cross-entropy; with the MSE decoder it is a Gaussian of
  unit variance around the decoded image, whose normalising constant puts a floor of
  392·ln 2π ≈ 720.4 nats under every NLL on 28×28 images: such numbers are not comparable with
  published (binarised-MNIST) ones. ``test/recon`` is therefore in nats for both decoders (for BCE
  it equals the trainer's ``val/recon``; for MSE the trainer reports the plain squared error).
- Binarised protocols (``binarize`` 'static' or 'dynamic') score one fixed Bernoulli draw of the
  evaluation images (seeded), so numbers do not depend on the batch size.
- The importance-weighted bound (Burda et al. 2015) −log (1/k) Σ_s p(x, z_s)/q(z_s|x) is an upper
  bound on −log p(x) that tightens as k grows (k = 1: the negative ELBO).
- Active units (Burda et al. 2015): dimension u is active when Cov_x(E_q[z_u|x]) > 0.01.
- ``fid_cls`` is a Fréchet distance on the penultimate features of a small MNIST CNN classifier
  (:mod:`vae.classifier`), between decoded prior samples and the real test images. It is *not*
  the Inception FID and is comparable only with itself.

Command line: ``python -m vae.evaluate --model_path checkpoints/run/best_model.pth --k 1000
--output_dir outputs/eval`` prints the metrics, writes ``metrics.json`` and every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from vae.data import ImageBatches, ImageData, Split, load_dataset, static_binarize
from vae.losses import gaussian_kl, log_normal, log_px_given_z
from vae.model import VAE
from vae.utils import retained_heap

__all__ = ["ACTIVE_UNIT_THRESHOLD", "active_units", "class_entropy", "elbo_and_latents", "encode_means",
           "evaluate", "frechet_distance", "iw_bound", "iw_log_weights", "iw_nll", "linear_probe",
           "sample_quality"]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015: active when Cov_x(E_q[z_u|x]) exceeds this


# -- likelihood -------------------------------------------------------------------------------
@torch.no_grad()
def iw_log_weights(model: nn.Module, x: torch.Tensor, k: int, loss_type: str, chunk: int = 1024,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x), z_s ~ q(z|x), s = 1..k: shape (B, k).

    The k samples are decoded in chunks of at most ``max(chunk, B)`` images per forward pass, so
    memory stays bounded for any k (k = 5,000 included).
    """
    mu, log_var = model.encode(x)
    std = torch.exp(0.5 * log_var)
    per_chunk = max(1, chunk // x.shape[0])
    out = []
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps  # (n, B, D)
        xs = x.repeat(n, 1, 1, 1)  # repeat tiles: s*B + b
        logits = model.decode_logits(z.reshape(-1, mu.shape[1]), xs)
        log_px = log_px_given_z(logits, xs, loss_type).view(n, -1)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        log_qz = log_normal(z, mu, log_var).sum(-1)
        out.append((log_px + log_pz - log_qz).T)
    return torch.cat(out, dim=1)


@torch.no_grad()
def iw_bound(model: nn.Module, batches: Iterable, k: int, loss_type: str, seed: int = 0,
             chunk: int = 1024) -> torch.Tensor:
    """Per-image importance-weighted bound −log (1/k) Σ_s w_s ≥ −log p(x), nats, shape (N,).

    Computed with log-sum-exp over the k log-weights. ``batches`` yields ``(x, labels)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model.eval()
    out, gen = [], None
    for x, _ in batches:
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        log_w = iw_log_weights(model, x, k, loss_type, chunk, gen)
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


# -- latent health ------------------------------------------------------------------------------
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


# -- sample quality -----------------------------------------------------------------------------
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
    from vae.classifier import predict_features

    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = torch.cat([model.decode(torch.randn(min(batch_size, num_samples - i), model.latent_dim,
                                                  generator=gen, device=device), generator=gen).float().cpu()
                         for i in range(0, num_samples, batch_size)])
    f_fake, logits_fake = predict_features(classifier, samples)
    f_real, _ = predict_features(classifier, real_images)
    return {"fid_cls": frechet_distance(f_real, f_fake), "class_entropy": class_entropy(logits_fake)}


# -- everything at once -------------------------------------------------------------------------
def _eval_images(split: Split, binarize: str, seed: int, limit: int) -> Split:
    """The first ``limit`` images (0 = all), binarised once with a fixed seed under binarised protocols."""
    images, labels = (split.images[:limit], split.labels[:limit]) if limit else (split.images, split.labels)
    if binarize in ("static", "dynamic"):
        images = static_binarize(images, seed)
    return Split(images, labels)


@retained_heap()  # the IW bound allocates and frees the same large buffers chunk after chunk
def evaluate(model: nn.Module, data: ImageData | Split, *, train: Split | None = None, loss_type: str = "bce",
             binarize: str = "none", k: int = 1000, device: str | torch.device | None = None, probe: bool = True,
             fid: bool = True, classifier: nn.Module | None = None, classifier_cache: str | Path | None = None,
             num_samples: int = 10000, max_test_images: int = 0, max_train_images: int = 0,
             batch_size: int = 500, iw_chunk: int = 1024, seed: int = 0, prefix: str = "test") -> dict[str, float]:
    """Every metric of a trained VAE as one flat dict of floats.

    Args:
        model: a :class:`vae.model.VAE` (moved to ``device`` when one is given).
        data: an :class:`ImageData` (its test images are evaluated; its training images feed the
            probe and, if needed, train the cached classifier), or a :class:`Split` to evaluate.
        train: the probe's training split when ``data`` is a Split (default: ``data.train_*``).
        loss_type: the decoder's likelihood, 'bce' or 'mse' (the config's reconstruction_loss_type).
        binarize: the data protocol the model was trained on ('none', 'static', 'dynamic').
        k: importance samples of the IW bound (0 skips it: it costs k decoder passes per image).
        probe: fit the linear probe (encodes the training images).
        fid: compute ``fid_cls`` and ``class_entropy`` (needs ``classifier`` or an ImageData).
        classifier: a trained :class:`vae.classifier.DigitClassifier`; default: the cached one.
        classifier_cache: folder of cached classifiers (default ``$VAE_CACHE_DIR/classifier``).
        num_samples: prior samples for the FID.
        max_test_images, max_train_images: use only the first N images (0 = all), for quick runs.
        iw_chunk: images per decoder pass of the IW bound (bounds memory).
        seed: seed of every random draw (binarisation, z samples, prior samples).
        prefix: key prefix, e.g. 'test' or 'val'.
    Returns:
        ``{prefix}/nelbo, /recon, /kl, /iw_nll_k{k}, /iw_nll_k{k}_se, /active_units, /kl_dim_max,
        /kl_dim_median, /probe_acc, /fid_cls, /class_entropy, /classifier_acc, /num_images,
        /eval_seconds`` (the optional parts only when computed).
    """
    t0 = time.perf_counter()
    if device is not None:
        model = model.to(device)
    device = next(model.parameters()).device
    was_training = model.training
    if isinstance(data, ImageData):
        test_split = Split(data.test_images, data.test_labels)
        train = train if train is not None else Split(data.train_images, data.train_labels)
    else:
        test_split = data
    if probe and train is None:
        raise ValueError("probe=True needs training images: pass an ImageData, or train=Split(...)")
    if fid and classifier is None and not isinstance(data, ImageData):
        raise ValueError("fid=True needs classifier=... or an ImageData to train the cached classifier from")

    test_split = _eval_images(test_split, binarize, seed, max_test_images)
    batches = ImageBatches(test_split, batch_size, shuffle=False, device=device)
    stats = elbo_and_latents(model, batches, loss_type, seed)
    p = prefix
    out = {f"{p}/num_images": float(len(test_split)), f"{p}/nelbo": float((stats["recon"] + stats["kl"]).mean()),
           f"{p}/recon": float(stats["recon"].mean()), f"{p}/kl": float(stats["kl"].mean())}
    n_active, _ = active_units(stats["mu"])
    out[f"{p}/active_units"] = float(n_active)
    out[f"{p}/kl_dim_max"] = float(stats["kl_per_dim"].max())
    out[f"{p}/kl_dim_median"] = float(stats["kl_per_dim"].median())
    if k > 0:
        bound = iw_bound(model, batches, k, loss_type, seed, iw_chunk)
        out[f"{p}/iw_nll_k{k}"] = float(bound.mean())
        out[f"{p}/iw_nll_k{k}_se"] = float(bound.std() / math.sqrt(len(bound))) if len(bound) > 1 else 0.0
    if probe:
        train_split = _eval_images(train, binarize, seed + 1, max_train_images)
        train_mu = encode_means(model, train_split.images, batch_size)
        out[f"{p}/probe_acc"] = linear_probe(train_mu, train_split.labels, stats["mu"], stats["labels"])
    if fid:
        if classifier is None:
            from vae.classifier import get_classifier

            classifier, info = get_classifier(data, classifier_cache, device)
            out[f"{p}/classifier_acc"] = info["test_acc"]
        real = data.test_images if isinstance(data, ImageData) else data.images
        real = real[:max_test_images] if max_test_images else real
        quality = sample_quality(model, classifier.to(device), real, num_samples, seed)
        out[f"{p}/fid_cls"], out[f"{p}/class_entropy"] = quality["fid_cls"], quality["class_entropy"]
    model.train(was_training)
    out[f"{p}/eval_seconds"] = time.perf_counter() - t0
    return out


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-evaluate", description="Evaluate a trained VAE on the MNIST test set.")
    p.add_argument("--model_path", required=True, help="checkpoint (best_model.pth or last.pth)")
    p.add_argument("--data_dir", default=None,
                   help="folder holding MNIST/raw (default: $VAE_DATA_DIR, else the checkpoint's data_dir)")
    p.add_argument("--output_dir", default="outputs/evaluation", help="folder for metrics.json and the figures")
    p.add_argument("--k", type=int, default=1000, help="importance samples of the IW bound, 0 = skip (default: 1000)")
    p.add_argument("--max_test_images", type=int, default=0, help="evaluate the first N test images (0 = all)")
    p.add_argument("--max_train_images", type=int, default=0, help="probe on the first N training images (0 = all)")
    p.add_argument("--num_samples", type=int, default=10000, help="prior samples for the FID (default: 10000)")
    p.add_argument("--no_probe", action="store_true", help="skip the linear probe")
    p.add_argument("--no_fid", action="store_true", help="skip the classifier FID and class entropy")
    p.add_argument("--no_figures", action="store_true", help="write metrics.json only")
    p.add_argument("--classifier_cache", default=None, help="folder of cached classifiers ($VAE_CACHE_DIR/classifier)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="(default: cpu)")
    return p


def _load_history(model_path: Path, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The training history stored in the checkpoint (last.pth) or in metrics.jsonl beside it."""
    if checkpoint.get("history"):
        return list(checkpoint["history"])
    metrics = model_path.parent / "metrics.jsonl"
    if metrics.is_file():
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return []


def _main(argv=None) -> int:
    from vae.config import validate_config
    from vae.utils import get_device, load_model

    args = build_parser().parse_args(argv)
    problems = [f"--{name}: must be >= {lo}, got {getattr(args, name)}" for name, lo in
                (("k", 0), ("max_test_images", 0), ("max_train_images", 0), ("num_samples", 2))
                if getattr(args, name) < lo]
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    device = get_device(args.device)
    model, checkpoint = load_model(args.model_path, device)
    cfg = validate_config(checkpoint["config"])
    data_dir = args.data_dir or os.environ.get("VAE_DATA_DIR") or cfg.data.data_dir
    data = load_dataset(data_dir, cfg.data.dataset)
    metrics = evaluate(model, data, loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize,
                       k=args.k, device=device, probe=not args.no_probe, fid=not args.no_fid,
                       classifier_cache=args.classifier_cache, num_samples=args.num_samples,
                       max_test_images=args.max_test_images, max_train_images=args.max_train_images, seed=args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(out / "metrics.json")
    if not args.no_figures:
        from vae.figures import write_figures

        figures = write_figures(model, data, _load_history(Path(args.model_path), checkpoint), out,
                                loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize, seed=args.seed)
        for path in figures.values():
            print(path)
    return 0


def cli(argv=None) -> None:
    from vae.train import run_cli

    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
