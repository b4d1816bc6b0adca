"""Sample quality: the Fréchet distance, the class entropy, the cached digit classifier."""

from __future__ import annotations

import math

import pytest
import torch

from vae.classifier import classifier_cache_path, get_classifier, predict_features
from vae.evaluate import class_entropy, frechet_distance


def test_frechet_distance_of_a_feature_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_matches_the_closed_form_for_an_affine_copy():
    # f2 = a·f1 + b: S2 = a²·S1 commutes with S1, so FD = ‖m1 − m2‖² + (1 − a)²·Tr S1.
    f1 = torch.randn(400, 6, generator=torch.Generator().manual_seed(0)).double() @ torch.randn(6, 6).double()
    a, b = 1.7, torch.linspace(-1, 1, 6).double()
    f2 = a * f1 + b
    expected = float((f1.mean(0) - f2.mean(0)).pow(2).sum() + (1 - a) ** 2 * torch.trace(torch.cov(f1.T)))
    assert frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9)


def test_fid_cls_of_test_images_against_themselves_is_near_zero(tiny_classifier, tiny_data):
    feats, _ = predict_features(tiny_classifier, tiny_data.test_images)
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_fid_cls_grows_when_images_are_replaced_by_noise(tiny_classifier, tiny_data):
    real, _ = predict_features(tiny_classifier, tiny_data.test_images[:100])
    other_real, _ = predict_features(tiny_classifier, tiny_data.test_images[100:])
    noise = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fake, _ = predict_features(tiny_classifier, noise)
    assert frechet_distance(real, fake) > 5 * frechet_distance(real, other_real)


def test_class_entropy_is_zero_for_one_class_and_ln10_for_all_classes_equally():
    one = torch.nn.functional.one_hot(torch.full((50,), 3), 10).float()
    uniform = torch.nn.functional.one_hot(torch.arange(10).repeat(5), 10).float()
    assert class_entropy(one) == 0.0
    assert class_entropy(uniform) == pytest.approx(math.log(10))


def test_classifier_is_trained_once_then_read_from_the_cache(tiny_data, tmp_path):
    first, info1 = get_classifier(tiny_data, tmp_path, width=4, feature_dim=16, epochs=1)
    second, info2 = get_classifier(tiny_data, tmp_path, width=4, feature_dim=16, epochs=1)
    assert (info1["trained"], info2["trained"]) == (True, False)
    assert info2["path"] == str(classifier_cache_path(tiny_data, tmp_path, 4, 16, 1))
    assert info2["test_acc"] == info1["test_acc"]
    for p1, p2 in zip(first.parameters(), second.parameters()):
        assert torch.equal(p1, p2)


def test_tiny_classifier_learns_the_tiny_digits(tiny_classifier, tiny_data):
    _, logits = predict_features(tiny_classifier, tiny_data.test_images)
    assert float((logits.argmax(1) == tiny_data.test_labels).float().mean()) > 0.5
