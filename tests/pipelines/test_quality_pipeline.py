"""The likelihood benchmark's run through the pipeline: the command ``benchmarks/quality.py`` prints
trains the same model into MLflow, with the same validation curve and the same test bound."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from benchmarks.quality import main as quality
from pipelines.training import _main as vae_pipeline

TINY = ["--epochs", "2", "--hidden_dims", "8", "16", "--latent_dim", "4", "--ar_channels", "8", "--ar_kernel", "3",
        "--batch_size", "50", "--val_size", "100", "--check_k", "0", "--snapshot_minutes", "0", "--k", "8",
        "--threads", "1", "--eval_threads", "1"]


def test_the_printed_pipeline_command_reproduces_the_benchmark_run_in_mlflow(prefect_harness, client, tiny_data_dir,
                                                                             tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert quality([*TINY, "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "quality")]) == 0
        results = json.loads((tmp_path / "quality" / "results.json").read_text())
        command = results["pipeline_command"]
        assert command.startswith("vae-pipeline --preset benchmark ") and "--num_epochs 2 " in command
        assert "--beta_steps " in command and "--sample_every 0 " in command and command.endswith("--iw_k 8")
        assert command in capsys.readouterr().out
        assert vae_pipeline([*shlex.split(command)[1:], "--checkpoint_dir", str(tmp_path / "pipeline"),
                             "--eval_max_train_images", "100"]) == 0
    finally:
        torch.set_num_threads(threads)
    [run] = client.search_runs([client.get_experiment_by_name("benchmark_vae").experiment_id])
    assert run.info.status == "FINISHED"
    local = [json.loads(line) for line in
             (tmp_path / "quality" / "benchmark_vae" / "metrics.jsonl").read_text().splitlines()]
    logged = client.get_metric_history(run.info.run_id, "val/nelbo")
    assert [m.step for m in logged] == [1, 2]
    assert [m.value for m in logged] == pytest.approx([row["val/nelbo"] for row in local], abs=1e-4)
    assert run.data.metrics["test/iw_nll_k8"] == pytest.approx(results["test/iw_nll"], abs=1e-4)
    assert run.data.metrics["test/nelbo"] == pytest.approx(results["test/nelbo"], abs=1e-4)
    [version] = client.search_model_versions(f"run_id = '{run.info.run_id}'")  # and the model is registered
    assert version.status == "READY"
