"""benchmarks/paired.py: two checkpoints on the held-out validation images, their paired difference."""

from __future__ import annotations

import json

import pytest

from benchmarks.paired import compare, main
from vae.checkpoint import load_checkpoint, load_model
from vae.data import load_dataset
from vae.export import export_weights
from vae.paired import held_out_images, per_image_scores


@pytest.fixture(scope="module")
def pair(trained_checkpoint, tmp_path_factory):
    """The trained model's EMA weights and its live ones: two different models of one split."""
    live = export_weights(trained_checkpoint, tmp_path_factory.mktemp("pair") / "live.pth", use_ema=False)
    return trained_checkpoint, live["output"]


def test_a_model_against_itself_differs_by_exactly_zero(trained_checkpoint, tiny_data_dir):
    out = compare(str(trained_checkpoint), str(trained_checkpoint), tiny_data_dir, k=5)
    cfg = load_checkpoint(trained_checkpoint)["config"]
    assert out["images"] == cfg["val_size"] and out["split"] == "val" and out["seed"] == cfg["seed"]
    assert out["difference"] == 0.0 and out["se"] == 0.0 and out["mean_a"] == out["mean_b"]


def test_two_models_are_scored_on_the_validation_images_with_one_seed(pair, tiny_data_dir):
    a, b = pair
    data = load_dataset(tiny_data_dir)
    out = compare(str(a), str(b), tiny_data_dir, k=5, images=40)
    cfg = load_checkpoint(a)["config"]
    split = {"val_size": cfg["val_size"], "seed": cfg["seed"], "max_train_samples": cfg["max_train_samples"]}
    images = held_out_images(data.train_images, data.train_labels, split, split, limit=40)
    scores = [per_image_scores(load_model(p)[0], images, loss_type=cfg["reconstruction_loss_type"],
                               binarize=cfg["binarize"], k=5, seed=cfg["seed"]) for p in (a, b)]
    assert out["images"] == 40
    # compare() scores the models on the fast path (the same function, float32 rounding apart)
    assert out["mean_a"] == pytest.approx(float(scores[0].mean()), rel=1e-7)
    assert out["mean_b"] == pytest.approx(float(scores[1].mean()), rel=1e-7)
    assert out["difference"] == pytest.approx(float((scores[0] - scores[1]).mean()), abs=1e-4)
    assert out["difference"] != 0.0 and out["se"] > 0.0  # EMA and live weights are different models


def test_cli_prints_the_difference_and_the_test_split_on_request(pair, tiny_data_dir, capsys):
    a, b = pair
    assert main([str(a), str(b), "--k", "3", "--split", "test", "--images", "30", "--data_dir", str(tiny_data_dir)]) is None
    line, record = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("IW bound k=3 on 30 test images (nats per image): A ")
    assert json.loads(record)["split"] == "test" and json.loads(record)["images"] == 30


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, tiny_data_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.paired", str(tmp_path / "nope.pth"), str(tmp_path / "b.pth"),
                           "--data_dir", str(tiny_data_dir)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_models_whose_bounds_are_not_comparable_are_refused(trained_checkpoint, tiny_data_dir, tmp_path):
    import torch

    from vae.errors import UserError

    state = load_checkpoint(trained_checkpoint)
    state["config"] = {**state["config"], "reconstruction_loss_type": "bce"}
    torch.save(state, tmp_path / "bce.pth")
    with pytest.raises(UserError, match="reconstruction_loss_type is 'mse'"):
        compare(str(trained_checkpoint), str(tmp_path / "bce.pth"), tiny_data_dir, k=2)
    state["config"] = {**load_checkpoint(trained_checkpoint)["config"], "dataset": "fashion_mnist"}
    torch.save(state, tmp_path / "fashion.pth")
    with pytest.raises(UserError, match="dataset is 'mnist'"):
        compare(str(trained_checkpoint), str(tmp_path / "fashion.pth"), tiny_data_dir, k=2)
