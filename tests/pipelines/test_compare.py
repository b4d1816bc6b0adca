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
    """A sweep: a parent run with no metric and three finished trials under it (latent_dim 2, 4, 4,
    learning rates 1e-4, 1e-3, 3e-3), each with a final val/nelbo; logged out of order."""
    exp_id = tracking.ensure_experiment(client, "compare-test")
    parent = client.create_run(exp_id, run_name="sweep", tags={tracking.TAG_RUN_KIND: "sweep"}).info.run_id
    tracking.log_params(client, parent, {"sweep.n_trials": 3})
    for name, latent, lr, nelbo in (("mid", 4, 1e-3, 104.0), ("worst", 2, 1e-4, 120.0), ("best", 4, 3e-3, 100.0)):
        run_id = client.create_run(exp_id, run_name=name, tags={tracking.TAG_RUN_KIND: "trial",
                                                                "mlflow.parentRunId": parent}).info.run_id
        tracking.log_params(client, run_id, {"model.latent_dim": latent, "train.learning_rate": lr,
                                             "loss.loss_type": "vae", "run.experiment_name": f"trial-{name}",
                                             "loss.reconstruction_loss_type": "bce", "data.binarize": "dynamic"})
        tracking.log_metrics(client, run_id, {"val/nelbo": nelbo + 50}, step=1)
        tracking.log_metrics(client, run_id, {"val/nelbo": nelbo}, step=2)
        client.set_terminated(run_id)
    client.set_terminated(parent)
    return "compare-test"


def test_frame_has_params_and_final_metrics_and_leaves_the_parent_out(experiment):
    df = compare.runs_frame(experiment)
    assert len(df) == 3 and "sweep" not in set(df["run_name"])
    assert sorted(df["params.model.latent_dim"]) == [2, 4, 4]  # numbers, not strings
    assert sorted(df["metrics.val/nelbo"]) == [100.0, 104.0, 120.0]  # the last value of each run
    assert set(df["status"]) == {"FINISHED"} and set(df["tags.run_kind"]) == {"trial"}


def test_rows_are_sorted_best_first_with_missing_metrics_last(experiment):
    df = compare.runs_frame(experiment)
    assert list(compare.sort_by_metric(df, "val/nelbo")["run_name"]) == ["best", "mid", "worst"]
    df.loc[df["run_name"] == "best", "metrics.val/nelbo"] = float("nan")
    assert list(compare.sort_by_metric(df, "val/nelbo")["run_name"]) == ["mid", "worst", "best"]
    df["metrics.test/probe_acc"] = [0.5, 0.9, 0.7]
    assert compare.sort_by_metric(df, "test/probe_acc")["metrics.test/probe_acc"].tolist() == [0.9, 0.7, 0.5]


def test_compare_writes_csv_a_sorted_table_of_the_swept_params_and_one_panel_per_param(experiment, tmp_path):
    paths = compare.compare(experiment, "val/nelbo", tmp_path)
    assert len(pd.read_csv(paths["csv"])) == 3
    lines = paths["markdown"].read_text().splitlines()
    assert lines[0] == "| run_name | status | model.latent_dim | train.learning_rate | val/nelbo |"
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| best", "| mid", "| worst"]
    assert "lower is better" in lines[-1] and "Bernoulli decoder" in lines[-1]
    assert paths["chart"].name == "val_nelbo_tradeoffs.png" and paths["chart"].read_bytes()[:4] == b"\x89PNG"
    df = compare.sort_by_metric(compare.runs_frame(experiment), "val/nelbo")
    fig = compare.tradeoff_figure(df, "val/nelbo", compare.swept_params(df))
    assert [ax.get_xlabel() for ax in fig.axes] == ["model.latent_dim", "train.learning_rate"]
    assert [ax.get_xscale() for ax in fig.axes] == ["linear", "log"]
    assert "#1 best" in [t.get_text() for t in fig.axes[0].texts]


def test_cli_prints_the_table(experiment, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        compare.cli(["--experiment", experiment, "--metric", "val/nelbo", "--param", "loss.loss_type",
                     "--out", str(tmp_path)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "| run_name | status | model.latent_dim | train.learning_rate | loss.loss_type | val/nelbo |" in out
    assert (tmp_path / "runs.csv").is_file()


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
        "error: no param 'model.latnet_dim' in these runs (have: data.binarize, loss.loss_type, "
        "loss.reconstruction_loss_type, model.latent_dim, run.experiment_name, train.learning_rate)"]
