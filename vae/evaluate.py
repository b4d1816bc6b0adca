"""Every metric of a trained VAE as one flat dict of floats: likelihood, latent health, samples.

:func:`evaluate` returns stable names (``test/nelbo``, ``test/iw_nll_k1000``,
``test/active_units``, ``test/probe_acc``, ``test/fid_cls``, ...) and logs nothing anywhere:
``pipelines/`` sends the dict to MLflow. The pieces live in :mod:`vae.likelihood` (IW bound,
negative ELBO) and :mod:`vae.metrics` (active units, linear probe, classifier FID).

Units and protocols:

- Likelihoods are nats per image with β = 1, whatever β trained the model. With the MSE decoder
  they carry the 720.4-nat constant of a unit-variance Gaussian (see :mod:`vae.likelihood`):
  such numbers are not comparable with published (binarised-MNIST) ones. ``test/recon`` is in
  nats for both decoders (for BCE it equals the trainer's ``val/recon``; for MSE the trainer
  reports the plain squared error).
- Binarised protocols (``binarize`` 'static' or 'dynamic') score one fixed Bernoulli draw of the
  evaluation images (seeded, :func:`vae.data.eval_split`), so numbers do not depend on the batch size.

Command line: ``python -m vae.evaluate --model_path checkpoints/run/best_model.pth --k 1000
--output_dir outputs/eval`` prints the metrics, writes ``metrics.json`` and every figure; on a
terminal it reports each stage on stderr (a line, a bar with ETA over the long loops), which
``--no_progress`` or the config's ``progress: false`` turn off and ``--progress`` turns on anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae import fast, settings
from vae.checkpoint import load_model
from vae.classifier import get_classifier
from vae.cli import run_cli
from vae.config import validate_config
from vae.data import ImageBatches, ImageData, Split, eval_split, load_dataset
from vae.device import get_device
from vae.figures import write_figures
from vae.files import write_atomic
from vae.likelihood import (elbo_and_latents, iw_bound, iw_log_weights, iw_nll, likelihood_protocol,
                            likelihood_reference)
from vae.progress import Progress
from vae.metrics import (ACTIVE_UNIT_THRESHOLD, active_units, class_entropy, encode_means, frechet_distance,
                         linear_probe, sample_quality)

__all__ = ["ACTIVE_UNIT_THRESHOLD", "active_units", "class_entropy", "elbo_and_latents", "encode_means",
           "evaluate", "frechet_distance", "iw_bound", "iw_log_weights", "iw_nll", "linear_probe",
           "sample_quality"]


def evaluate(model: nn.Module, data: ImageData | Split, *, train: Split | None = None, loss_type: str = "bce",
             binarize: str = "none", k: int = 1000, device: str | torch.device | None = None, probe: bool = True,
             fid: bool = True, classifier: nn.Module | None = None, classifier_cache: str | Path | None = None,
             num_samples: int = 10000, max_test_images: int = 0, max_train_images: int = 0,
             batch_size: int = 500, iw_chunk: int = 1024, seed: int = 0, prefix: str = "test",
             retain_memory: bool = True, progress: bool | None = None) -> dict[str, float]:
    """Every metric of a trained VAE as one flat dict of floats.

    Args:
        model: a :class:`vae.model.VAE` (moved to ``device`` when one is given).
        data: an :class:`ImageData` (its test images are evaluated; its training images feed the
            probe and, if needed, train the cached classifier), or a :class:`Split` to evaluate.
        train: the probe's training split when ``data`` is a Split (default: ``data.train_*``).
        loss_type, binarize: the decoder's likelihood ('bce' or 'mse': the config's
            reconstruction_loss_type) and the data protocol it trained on ('none', 'static', 'dynamic').
        k, iw_chunk: importance samples of the IW bound (0 skips it: it costs k decoder passes per
            image); images per decoder pass of the bound (bounds memory).
        probe, fid: fit the linear probe (encodes the training images); compute ``fid_cls`` and
            ``class_entropy`` (needs ``classifier`` or an ImageData to train the cached one from).
        classifier, classifier_cache: a trained :class:`vae.classifier.DigitClassifier`, else the
            cached one from this folder (default ``$VAE_CACHE_DIR/classifier``).
        num_samples, max_test_images, max_train_images: prior samples for the FID; use only the
            first N test / training images (0 = all), for quick runs.
        seed, prefix: seed of every random draw (binarisation, z, prior samples); key prefix ('test').
        retain_memory: run under :func:`vae.fast.retained_heap` (the IW bound frees and reallocates
            the same large buffers chunk after chunk).
        progress: a line per stage and a bar (with ETA) over the long loops, on stderr: True, False,
            or None = when stderr is a terminal (:class:`vae.progress.Progress`).
    Returns:
        ``{prefix}/nelbo, /recon, /kl, /iw_nll_k{k}, /iw_nll_k{k}_se, /active_units, /kl_dim_max,
        /kl_dim_median, /probe_acc, /fid_cls, /class_entropy, /classifier_acc, /num_images, /eval_seconds``.
    """
    t0 = time.perf_counter()
    model = model.to(device) if device is not None else model
    device = next(model.parameters()).device
    test = Split(data.test_images, data.test_labels) if isinstance(data, ImageData) else data
    if train is None and isinstance(data, ImageData):
        train = Split(data.train_images, data.train_labels)
    if probe and train is None:
        raise ValueError("probe=True needs training images: pass an ImageData, or train=Split(...)")
    if fid and classifier is None and not isinstance(data, ImageData):
        raise ValueError("fid=True needs classifier=... or an ImageData to train the cached classifier from")
    report, was_training = Progress(progress), model.training
    with fast.retained_heap(retain_memory):
        test = eval_split(test, binarize, seed, max_test_images)
        batches = ImageBatches(test, batch_size, shuffle=False, device=device)
        out, stats = _likelihood_metrics(model, batches, loss_type, k, seed, iw_chunk, report)
        if probe:
            train = eval_split(train, binarize, seed + 1, max_train_images)
            with report.stage(f"linear probe (encode {len(train)} training images, fit)"):
                out["probe_acc"] = linear_probe(encode_means(model, train.images, batch_size), train.labels,
                                                stats["mu"], stats["labels"])
        if fid:
            out.update(_sample_metrics(model, data, classifier, classifier_cache, num_samples, seed,
                                       max_test_images, retain_memory, report))
    model.train(was_training)
    out["eval_seconds"] = time.perf_counter() - t0
    return {f"{prefix}/{key}": value for key, value in out.items()}


def _likelihood_metrics(model: nn.Module, batches: ImageBatches, loss_type: str, k: int, seed: int, iw_chunk: int,
                        report: Progress) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Negative ELBO, latent health and (k > 0) the IW bound; and the per-image stats (the probe's)."""
    with report.stage(f"negative ELBO and latents ({len(batches.images)} images)"):
        stats = elbo_and_latents(model, report.track(batches, "ELBO", total=len(batches)), loss_type, seed)
    out = _elbo_metrics(stats)
    if k > 0:
        with report.stage(f"IW bound, k = {k} ({len(stats['recon'])} images)"):
            with report.counter(f"IW bound k={k}", total=len(batches.images) * k, unit="sample") as tick:
                bound = iw_bound(model, batches, k, loss_type, seed, iw_chunk, tick)
        out[f"iw_nll_k{k}"] = float(bound.mean())
        out[f"iw_nll_k{k}_se"] = float(bound.std() / math.sqrt(len(bound))) if len(bound) > 1 else 0.0
    return out, stats


def _elbo_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Negative ELBO, its terms and the latent-health numbers from :func:`elbo_and_latents`."""
    return {"num_images": float(len(stats["recon"])), "nelbo": float((stats["recon"] + stats["kl"]).mean()),
            "recon": float(stats["recon"].mean()), "kl": float(stats["kl"].mean()),
            "active_units": float(active_units(stats["mu"])[0]), "kl_dim_max": float(stats["kl_per_dim"].max()),
            "kl_dim_median": float(stats["kl_per_dim"].median())}


def _sample_metrics(model, data, classifier, classifier_cache, num_samples: int, seed: int, max_test_images: int,
                    retain_memory: bool, report: Progress) -> dict[str, float]:
    """``fid_cls`` and ``class_entropy`` of prior samples (and the cached classifier's accuracy)."""
    device, out = next(model.parameters()).device, {}
    if classifier is None:
        classifier, info = get_classifier(data, classifier_cache, device, retain_memory=retain_memory,
                                          progress=report)
        out["classifier_acc"] = info["test_acc"]
    real = data.test_images if isinstance(data, ImageData) else data.images
    real = real[:max_test_images] if max_test_images else real
    with report.stage(f"sample quality ({num_samples} prior samples, classifier FID)"):
        quality = sample_quality(model, classifier.to(device), real, num_samples, seed)
    return {**out, "fid_cls": quality["fid_cls"], "class_entropy": quality["class_entropy"]}


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
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--progress", action="store_true", default=None,
                       help="stage lines and bars (with ETA) on stderr even when it is not a terminal")
    shown.add_argument("--no_progress", action="store_false", dest="progress",
                       help="none (default: shown on a terminal, unless the checkpoint's config says progress: false)")
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
    model = fast.accelerate(model, device, enabled=cfg.run.fast)
    data_dir = args.data_dir or settings.current().data_dir or cfg.data.data_dir
    data = load_dataset(data_dir, cfg.data.dataset)
    progress = args.progress if args.progress is not None else (None if cfg.run.progress else False)
    metrics = evaluate(model, data, loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize,
                       k=args.k, device=device, probe=not args.no_probe, fid=not args.no_fid,
                       classifier_cache=args.classifier_cache, num_samples=args.num_samples,
                       max_test_images=args.max_test_images, max_train_images=args.max_train_images, seed=args.seed,
                       retain_memory=cfg.run.fast and cfg.run.retain_memory, progress=progress)
    out = Path(args.output_dir)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    loss, binarize = cfg.loss.reconstruction_loss_type, cfg.data.binarize
    if args.k:  # what the iw_nll number above is (the nelbo and recon share its unit)
        print(f"likelihoods: {likelihood_protocol(loss, binarize, args.k, args.max_test_images)} "
              f"({likelihood_reference(loss, binarize)})")
    print(out / "metrics.json")
    if not args.no_figures:
        with Progress(progress).stage(f"figures into {out}"):
            figures = write_figures(model, data, _load_history(Path(args.model_path), checkpoint), out,
                                    loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize,
                                    seed=args.seed)
        for path in figures.values():
            print(path)
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
