"""Pipeline runs stopped on request (SIGTERM, as `kill PID` or a scheduler sends it): in training
or while the model is scored, the MLflow run ends KILLED, nothing is scored or registered (a
retraining promotes nothing), the command line prints one `stopped:` line naming the `--resume`
command and exits 130; that command then finishes the run into the same MLflow run."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import (FAST_EVAL, TINY_FLOW, cli_flags, start_pipeline, stop_pipeline, tally,
                                        task_running)


def _killed_with_nothing_registered(client, run_id: str) -> None:
    import tracking

    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags[tracking.TAG_FAILURE_REASON]
    assert not [k for k in run.data.metrics if k.startswith("test/")], run.data.metrics
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
    assert client.search_registered_models() == []  # so no alias either: nothing promoted


def test_sigterm_stops_a_pipeline_run_killed_with_nothing_scored_and_resume_finishes_it(
        prefect_harness, mlflow_store, procs, tiny_data_dir, tmp_path):
    """`vae-pipeline` on SIGTERM: the step finishes, `last.pth` is saved, the MLflow run ends KILLED
    with how to continue, the partial model is neither scored nor registered, exit 130 with one
    line; `--resume RUN_ID` then trains the rest into the same run and registers it."""
    import tracking
    from pipelines.retraining import vae_retraining
    from pipelines.tasks import ResumeError
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"
    flags = cli_flags({**TINY_FLOW, "num_epochs": 500, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "rel-sigterm", "iw_k": 4, "eval_max_images": 50})
    proc = start_pipeline(procs, "pipelines.training", ["--preset", "small", *flags], VAE_MLRUNS_DIR=str(mlflow_store))
    run_id, last, last_line = stop_pipeline(proc, lambda: list(ckpt.glob("pipeline/*/*/last.pth")), ckpt)
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), last_line
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in last_line, last_line  # not the default folder
    client = tracking.get_client()
    _killed_with_nothing_registered(client, run_id)
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 500
    with pytest.raises(ResumeError, match=f"it is a training run; continue it with: python -m pipelines.training "
                                          f"--resume {run_id} --checkpoint_dir "):
        vae_retraining(resume_run_id=run_id, overrides={"checkpoint_dir": str(ckpt)}, **FAST_EVAL, figures=False)
    assert client.get_run(run_id).info.status == "KILLED"  # untouched: not decided on as a challenger

    out = vae_training(resume_run_id=run_id, num_epochs=done + 1, overrides={"checkpoint_dir": str(ckpt)},
                       **FAST_EVAL, figures=False, tracking_wait_s=10)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"].startswith("KILLED: ")
    assert "test/iw_nll_k4" in run.data.metrics and out["model_version"]
    tally("runs_checked")


def test_sigterm_while_scoring_ends_the_run_killed_unregistered_and_resume_scores_it(
        prefect_harness, mlflow_store, procs, tiny_data_dir, tmp_path):
    """SIGTERM after training, during the evaluation: the run ends KILLED with no test metrics and
    no model version, exit 130 with one line; `--resume` finds training complete and scores it."""
    import tracking
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"  # an evaluation that takes minutes: k = 20,000 samples per image
    flags = cli_flags({**TINY_FLOW, "num_epochs": 1, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "rel-sigterm-eval", "iw_k": 20000, "eval_max_images": 200})
    proc = start_pipeline(procs, "pipelines.training", ["--preset", "small", *flags], VAE_MLRUNS_DIR=str(mlflow_store))
    run_id, last, last_line = stop_pipeline(proc, lambda: task_running("evaluate"), ckpt)
    assert last_line.startswith("stopped: scoring the trained model stopped (SIGTERM); nothing was registered"), \
        last_line
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in last_line, last_line
    client = tracking.get_client()
    _killed_with_nothing_registered(client, run_id)
    assert load_checkpoint(last)["epoch"] == 1  # training had finished

    out = vae_training(resume_run_id=run_id, overrides={"checkpoint_dir": str(ckpt)}, **FAST_EVAL, figures=False,
                       tracking_wait_s=10)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED" and out["model_version"]
    assert run.data.tags["resumed_from"].startswith("KILLED: ") and "test/iw_nll_k4" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "val/nelbo")] == [1]  # no epoch trained again
    tally("runs_checked")


def test_sigterm_stops_a_nightly_retraining_unpromoted_and_its_resume_decides(
        prefect_harness, mlflow_store, procs, tmp_path):
    """`python -m pipelines.retraining` (what the nightly deployment runs) on SIGTERM: the
    challenger's run ends KILLED, nothing is registered or promoted, exit 130 with one line naming
    `pipelines.retraining --resume RUN_ID`, which finishes the run and then decides."""
    import tracking
    from pipelines.retraining import vae_retraining
    from pipelines.tasks import ResumeError
    from pipelines.training import vae_training
    from tests.conftest import write_idx_dataset
    from vae.checkpoint import load_checkpoint

    data_dir = write_idx_dataset(tmp_path / "data", n_train=1100)  # the small preset holds out 1,000
    proc = start_pipeline(procs, "pipelines.retraining", ["--num_epochs", "500", "--iw_k", "4", "--eval_max_images",
                                                          "50"], VAE_MLRUNS_DIR=str(mlflow_store), VAE_DATA_DIR=str(data_dir))
    ckpt = tmp_path / "checkpoints"  # the preset's folder, in the process's working directory
    run_id, last, last_line = stop_pipeline(proc, lambda: list(ckpt.glob("pipeline/*/*/last.pth")), ckpt)
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), last_line
    assert last_line.endswith(f"continue it with: python -m pipelines.retraining --resume {run_id}"), last_line
    client = tracking.get_client()
    _killed_with_nothing_registered(client, run_id)
    assert client.get_run(run_id).data.tags[tracking.TAG_RUN_KIND] == "retraining"

    done = load_checkpoint(last)["epoch"]
    with pytest.raises(ResumeError, match=f"it is a retraining's challenger; continue it with: "
                                          f"python -m pipelines.retraining --resume {run_id}"):
        vae_training(resume_run_id=run_id, overrides={"checkpoint_dir": str(ckpt), "data_dir": str(data_dir)},
                     **FAST_EVAL, figures=False)
    assert client.get_run(run_id).info.status == "KILLED"  # untouched: a challenger is decided on after training
    out = vae_retraining(resume_run_id=run_id, overrides={"num_epochs": done + 1, "checkpoint_dir": str(ckpt),
                                                          "data_dir": str(data_dir)},
                         iw_k=4, eval_max_images=50, eval_probe=False, eval_fid=False, figures=False)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"].startswith("KILLED: ")
    assert out["decision"] == "promoted" and out["champion_version"] == out["challenger_version"]  # the first model
    assert client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION).run_id == run_id
    tally("runs_checked")
