"""evaluate(): one flat dict of floats with stable names; expensive parts can be switched off."""

from __future__ import annotations

import math

import pytest

from vae.data import Split
from vae.evaluate import evaluate

CHEAP = {"test/num_images", "test/nelbo", "test/recon", "test/kl", "test/active_units", "test/kl_dim_max",
         "test/kl_dim_median", "test/eval_seconds"}


@pytest.fixture(scope="module")
def full_metrics(tiny_model, tiny_data, tiny_classifier):
    return evaluate(tiny_model, tiny_data, loss_type="bce", binarize="dynamic", k=20, classifier=tiny_classifier,
                    num_samples=200, device="cpu")


def test_evaluate_returns_every_metric_under_its_stable_name(full_metrics):
    assert set(full_metrics) == CHEAP | {"test/iw_nll_k20", "test/iw_nll_k20_se", "test/probe_acc",
                                         "test/fid_cls", "test/class_entropy"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in full_metrics.values())


def test_evaluate_nelbo_is_recon_plus_kl_and_above_the_iw_bound(full_metrics):
    m = full_metrics
    assert m["test/nelbo"] == pytest.approx(m["test/recon"] + m["test/kl"], rel=1e-6)
    assert m["test/iw_nll_k20"] < m["test/nelbo"]


def test_evaluate_probe_beats_chance_on_a_trained_model(full_metrics):
    assert full_metrics["test/probe_acc"] > 0.3


def test_evaluate_skips_the_expensive_parts_when_switched_off(tiny_model, tiny_data):
    metrics = evaluate(tiny_model, tiny_data, k=0, probe=False, fid=False, max_test_images=50)
    assert set(metrics) == CHEAP
    assert metrics["test/num_images"] == 50.0


def test_evaluate_accepts_splits_and_a_prefix(tiny_model, tiny_data, tiny_classifier):
    test = Split(tiny_data.test_images[:40], tiny_data.test_labels[:40])
    train = Split(tiny_data.train_images[:200], tiny_data.train_labels[:200])
    metrics = evaluate(tiny_model, test, train=train, k=2, classifier=tiny_classifier, num_samples=50, prefix="val")
    assert {"val/nelbo", "val/iw_nll_k2", "val/probe_acc", "val/fid_cls"} <= set(metrics)


def test_evaluate_refuses_a_split_without_probe_images(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="probe=True needs training images"):
        evaluate(tiny_model, Split(tiny_data.test_images, tiny_data.test_labels), k=0, fid=False)
