"""Paired comparison: held-out images are exactly the validation split less what the other model
trained on; per-image scores share their noise under one seed; the difference's standard error."""

from __future__ import annotations

import math

import pytest
import torch

from vae.data import ImageData, split_indices, split_train_val
from vae.model import VAE
from vae.paired import held_out_images, paired_difference, per_image_scores

N = 400


def numbered() -> tuple[torch.Tensor, torch.Tensor]:
    """Training images whose first pixel is their index (so a split's images name themselves)."""
    images = torch.zeros(N, 28, 28, dtype=torch.int64)
    images[:, 0, 0] = torch.arange(N)
    return images, torch.arange(N) % 10


def split(seed: int, val_size: int = 50, max_train_samples: int = 0) -> dict[str, int]:
    return {"val_size": val_size, "seed": seed, "max_train_samples": max_train_samples}


def test_same_split_gives_the_trainers_validation_images_in_order():
    images, labels = numbered()
    data = ImageData(images, labels, images[:1], labels[:1], {})
    _, val = split_train_val(data, 50, 7)
    assert torch.equal(held_out_images(images, labels, split(7), split(7)).images, val.images)
    assert torch.equal(held_out_images(images, labels, split(7), split(7), limit=20).images, val.images[:20])


def test_images_the_other_model_trained_on_are_left_out():
    images, labels = numbered()
    ids = held_out_images(images, labels, split(1), split(2)).images[:, 0, 0]
    other_train, _ = split_indices(N, 50, 2)
    own_val = set(split_indices(N, 50, 1)[1].tolist())
    assert 0 < len(ids) < 50 and set(ids.tolist()) <= own_val
    assert not set(ids.tolist()) & set(other_train.tolist())
    # Images past the other's max_train_samples were never trained on by it: kept.
    beyond = set(held_out_images(images, labels, split(1), split(2, max_train_samples=100)).images[:, 0, 0].tolist())
    assert {i for i in own_val if i >= 100} <= beyond


def test_paired_difference_mean_and_standard_error():
    out = paired_difference(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4))
    assert out["difference"] == 2.5 and out["mean_a"] == 2.5 and out["mean_b"] == 0.0 and out["images"] == 4
    assert out["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    same = paired_difference(torch.ones(3), torch.ones(3))
    assert same["difference"] == 0.0 and same["se"] == 0.0
    with pytest.raises(ValueError):
        paired_difference(torch.ones(3), torch.ones(4))


def test_scores_of_one_model_under_one_seed_are_identical_and_the_seed_matters():
    torch.manual_seed(0)
    model = VAE(hidden_dims=[8, 16], latent_dim=4).eval()
    images, labels = numbered()
    pixels = held_out_images((torch.rand(N, 28, 28) * 255).to(torch.uint8), labels, split(0), limit=30)
    kw = dict(loss_type="bce", binarize="static", k=4)
    a, b = per_image_scores(model, pixels, seed=3, **kw), per_image_scores(model, pixels, seed=3, **kw)
    assert a.shape == (30,) and a.dtype == torch.float64 and torch.equal(a, b)
    assert not torch.equal(a, per_image_scores(model, pixels, seed=4, **kw))
    nelbo = per_image_scores(model, pixels, seed=3, **{**kw, "k": 0})
    assert nelbo.shape == (30,) and torch.isfinite(nelbo).all()
