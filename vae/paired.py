"""Two models compared on the same held-out images, with the noise of the comparison measured.

A champion/challenger decision made on the test set, night after night, selects on test-set
noise; one made on two means alone cannot tell a real gain from the luck of the images and of
the importance samples. Here both models score the *same* images (held out from both), binarised
once with the *same* seed, with the *same* seed for the bound's samples (common random numbers),
so per-image differences cancel most of that luck, and their standard error says how much is
left: :func:`paired_difference`.

- :func:`held_out_images`: the validation images of a split that another model never trained on.
- :func:`per_image_scores`: per-image IW bound (k > 0) or negative ELBO (k = 0), nats.
- :func:`paired_difference`: mean of ``a - b``, its standard error, both means.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vae.data import Split, split_indices
from vae.ood import anomaly_scores

__all__ = ["COMPARABLE_KEYS", "SPLIT_KEYS", "held_out_images", "paired_difference", "per_image_scores"]

COMPARABLE_KEYS = ("reconstruction_loss_type", "binarize", "dataset")  # two bounds mean the same only if equal
SPLIT_KEYS = ("val_size", "seed", "max_train_samples")  # a config's train/validation split (held_out_images)


def held_out_images(train_images: torch.Tensor, train_labels: torch.Tensor, split: dict[str, int],
                    other: dict[str, int] | None = None, limit: int = 0) -> Split:
    """The validation images of ``split`` (the first ``limit``, 0 = all) that ``other`` did not train on.

    Args:
        train_images, train_labels: the dataset's training set (validation images come from it).
        split, other: ``{"val_size", "seed", "max_train_samples"}`` of two models' configs (as
            :func:`vae.data.split_train_val` uses them); with equal splits nothing is dropped.
    """
    n = len(train_images)
    _, val = split_indices(n, split["val_size"], split["seed"], split["max_train_samples"])
    if other is not None:
        seen = torch.zeros(n, dtype=torch.bool)
        seen[split_indices(n, other["val_size"], other["seed"], other["max_train_samples"])[0]] = True
        val = val[~seen[val]]
    val = val[:limit] if limit else val
    return Split(train_images[val], train_labels[val])


@torch.no_grad()
def per_image_scores(model: nn.Module, images: Split, *, loss_type: str, binarize: str, k: int, seed: int,
                     batch_size: int = 500, iw_chunk: int = 1024) -> torch.Tensor:
    """Per-image IW bound with ``k`` samples (k = 0: one-sample negative ELBO), nats, shape (N,), float64.

    The images are binarised once with ``seed`` (as :func:`vae.evaluate.evaluate` does) and the
    bound's samples drawn from ``seed``: two models scored with one seed see the same images and
    the same noise (:func:`vae.ood.anomaly_scores` computes them).
    """
    was_training = model.training
    scores = anomaly_scores(model, images.images, loss_type, binarize, k=k, seed=seed, batch_size=batch_size,
                            iw_chunk=iw_chunk, complexity=False)
    model.train(was_training)
    return scores["iw_bound"] if k > 0 else scores["nelbo"]


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Mean and standard error of the per-image difference ``a - b`` (same images, same order).

    Returns:
        ``{"images", "mean_a", "mean_b", "difference", "se"}``; ``se`` is the sample standard
        deviation of the differences over sqrt(N) (NaN for fewer than 2 images).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same images, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a.double() - b.double())
    n = len(d)
    se = float(d.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"images": n, "mean_a": float(a.double().mean()) if n else float("nan"),
            "mean_b": float(b.double().mean()) if n else float("nan"),
            "difference": float(d.mean()) if n else float("nan"), "se": se}
