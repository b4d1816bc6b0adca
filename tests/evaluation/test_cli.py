"""vae-evaluate: metrics JSON and figures from a checkpoint; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest

from vae.evaluate import cli


def test_cli_writes_metrics_json_and_figures(tiny_run, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model_path", tiny_run["best_model_path"], "--data_dir", str(tiny_data_dir), "--k", "3",
             "--no_fid", "--max_train_images", "300", "--output_dir", str(out)])
    assert exit_info.value.code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test/nelbo", "test/iw_nll_k3", "test/probe_acc"} <= set(metrics) and "test/fid_cls" not in metrics
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "latent_pca.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "test/iw_nll_k3:" in printed
    assert "likelihoods: IW bound, k=3, all test images; nats per image" in printed  # what the number is


def test_cli_exits_2_with_one_line_for_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model_path", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "checkpoint not found" in err


def test_cli_exits_2_for_a_negative_k(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model_path", tiny_run["best_model_path"], "--k", "-1", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--k: must be >= 0" in capsys.readouterr().err
