"""A small CNN digit classifier: the feature extractor of the classifier-based FID.

Inception FID needs downloaded ImageNet weights and natural-image features; on MNIST the
customary alternative is a Fréchet distance on the penultimate features of an MNIST classifier
(sometimes called the Fréchet LeNet Distance). Numbers from it are comparable only with numbers
from the same classifier, never with Inception FIDs.

The classifier is never downloaded: :func:`get_classifier` trains it once from the local training
images and caches it under ``$VAE_CACHE_DIR/classifier/`` (default ``~/.cache/vae-mlops``), keyed
by the dataset's digest and the architecture, with its test accuracy stored beside the weights.
It is saved with :func:`vae.checkpoint.save_checkpoint` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vae.data import ImageData
from vae import settings
from vae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae.fast import retained_heap
from vae.progress import Progress

__all__ = ["DigitClassifier", "classifier_accuracy", "classifier_cache_path", "get_classifier",
           "predict_features", "train_classifier"]


class DigitClassifier(nn.Module):
    """conv(3x3) → pool → conv(3x3) → pool → fc (features) → fc (10 logits).

    Args:
        width: channels of the first conv layer (the second has twice as many).
        feature_dim: size of the penultimate layer, whose activations feed the Fréchet distance.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),              # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
        )
        self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28) in [0, 1] -> penultimate activations (B, feature_dim)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or float (N, 1, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.float().div(255)
    return images if images.dim() == 4 else images.unsqueeze(1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, width: int = 32, feature_dim: int = 128,
                     epochs: int = 3, batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
                     device: str | torch.device = "cpu", retain_memory: bool = True,
                     progress: Progress | None = None) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with Adam and a cosine learning-rate decay.

    Args:
        images: uint8 (N, 28, 28) or float (N, 1, 28, 28) in [0, 1]; labels int (N,).
        retain_memory: train under :func:`vae.fast.retained_heap` (a training loop frees and
            reallocates the same activation buffers every step).
        progress: a bar per epoch (off by default).
    Returns:
        The trained model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), retained_heap(retain_memory):
        torch.manual_seed(seed)  # init and dropout: reproducible, the caller's RNG untouched
        model = DigitClassifier(width, feature_dim).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        steps = epochs * math.ceil(len(images) / batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            starts = range(0, len(images), batch_size)
            for start in (progress.track(starts, f"classifier epoch {epoch + 1}/{epochs}") if progress else starts):
                idx = order[start:start + batch_size]
                x, y = _as_float(images[idx]).to(device), labels[idx].to(device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return model.eval()


@torch.no_grad()
def predict_features(model: DigitClassifier, images: torch.Tensor, batch_size: int = 1000
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, feature_dim), logits (N, 10)) of uint8 or [0, 1] float images, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = _as_float(images[start:start + batch_size]).to(device)
        f = model.features(x)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted class is the label."""
    _, logits = predict_features(model, images)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def classifier_cache_path(data: ImageData, cache_dir: str | Path | None = None, width: int = 32,
                          feature_dim: int = 128, epochs: int = 3) -> Path:
    """``<cache_dir>/<dataset>-<digest[:16]>-w<width>-f<feature_dim>-e<epochs>.pth``.

    ``cache_dir`` defaults to ``$VAE_CACHE_DIR/classifier`` (``~/.cache/vae-mlops/classifier``).
    """
    if cache_dir is None:
        cache_dir = settings.current().cache_dir / "classifier"
    return Path(cache_dir) / f"{data.name}-{data.digest[:16]}-w{width}-f{feature_dim}-e{epochs}.pth"


def get_classifier(data: ImageData, cache_dir: str | Path | None = None, device: str | torch.device = "cpu", *,
                   width: int = 32, feature_dim: int = 128, epochs: int = 3, seed: int = 0,
                   retrain: bool = False, retain_memory: bool = True,
                   progress: Progress | None = None) -> tuple[DigitClassifier, dict[str, Any]]:
    """The cached classifier for this dataset, trained on its training images on first use
    (``retain_memory``, ``progress``: see :func:`train_classifier`; a stage line while it trains).

    Returns:
        (model in eval mode, info) where info holds ``test_acc``, ``path`` and ``trained``
        (True when it was trained by this call rather than read from the cache).
    """
    path = classifier_cache_path(data, cache_dir, width, feature_dim, epochs)
    if path.is_file() and not retrain:
        try:
            state = load_checkpoint(path, map_location=device)
            model = DigitClassifier(state["width"], state["feature_dim"]).to(device)
            model.load_state_dict(state["model_state"])
            return model.eval(), {"test_acc": float(state["test_acc"]), "path": str(path), "trained": False}
        except (CheckpointError, KeyError, RuntimeError):
            pass  # a damaged or foreign cache file: train afresh and overwrite it
    progress = progress or Progress(False)
    with progress.stage(f"digit classifier for the FID: training on {len(data.train_images)} images "
                        f"(first use; cached in {path.parent})"):
        model = train_classifier(data.train_images, data.train_labels, width=width, feature_dim=feature_dim,
                                 epochs=epochs, seed=seed, device=device, retain_memory=retain_memory,
                                 progress=progress)
        test_acc = classifier_accuracy(model, data.test_images, data.test_labels)
    save_checkpoint({"model_state": model.state_dict(), "width": width, "feature_dim": feature_dim,
                     "epochs": epochs, "seed": seed, "test_acc": test_acc, "dataset": data.name,
                     "dataset_digest": data.digest}, path)
    return model, {"test_acc": test_acc, "path": str(path), "trained": True}
