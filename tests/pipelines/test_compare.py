"""pipelines.compare on a real MLflow store: the DataFrame, the files, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tracking
from pipelines import compare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def experiment(client) -> str:
    """Three finished runs with latent_dim 2, 4, 4 and a final val/nelbo each."""
    exp_id = tracking.ensure_experiment(client, "compare-test")
    for latent, nelbo in ((2, 120.0), (4, 100.0), (4, 104.0)):
        run_id = client.create_run(exp_id, tags={tracking.TAG_RUN_KIND: "training"}).info.run_id
        tracking.log_params(client, run_id, {"model.latent_dim": latent, "loss.loss_type": "vae"})
        tracking.log_metrics(client, run_id, {"val/nelbo": nelbo + 50}, step=1)
        tracking.log_metrics(client, run_id, {"val/nelbo": nelbo}, step=2)
        client.set_terminated(run_id)
    return "compare-test"


def test_frame_has_params_and_final_metrics(experiment):
    df = compare.runs_frame(experiment)
    assert len(df) == 3
    assert sorted(df["params.model.latent_dim"]) == [2, 4, 4]  # numbers, not strings
    assert sorted(df["metrics.val/nelbo"]) == [100.0, 104.0, 120.0]  # the last value of each run
    assert set(df["status"]) == {"FINISHED"} and set(df["tags.run_kind"]) == {"training"}


def test_compare_writes_csv_markdown_and_chart(experiment, tmp_path):
    paths = compare.compare(experiment, "val/nelbo", "model.latent_dim", tmp_path)
    assert len(pd.read_csv(paths["csv"])) == 3
    md = paths["markdown"].read_text()
    assert md.startswith("| run_id | status | params.model.latent_dim | metrics.val/nelbo |") and md.count("\n") == 5
    assert paths["chart"].name == "val_nelbo_vs_model_latent_dim.png"
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_the_table(experiment, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        compare.cli(["--experiment", experiment, "--metric", "val/nelbo", "--param", "model.latent_dim",
                     "--out", str(tmp_path)])
    assert done.value.code == 0
    assert "metrics.val/nelbo" in capsys.readouterr().out and (tmp_path / "runs.csv").is_file()


def test_cli_exits_2_with_one_line_on_an_unknown_experiment(experiment, capsys):
    with pytest.raises(SystemExit) as done:
        compare.cli(["--experiment", "nope"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no experiment named 'nope'") and "compare-test" in err[0]


def test_cli_module_exits_2_with_one_line_on_an_unknown_param(experiment, mlflow_store, tmp_path):
    env = {**os.environ, "VAE_MLRUNS_DIR": str(mlflow_store)}
    bad = subprocess.run([sys.executable, "-m", "pipelines.compare", "--experiment", experiment, "--param",
                          "model.latnet_dim", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: no param 'model.latnet_dim' in these runs (have: loss.loss_type, model.latent_dim)"]
