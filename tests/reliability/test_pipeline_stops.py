"""Pipeline runs stopped on request (SIGTERM, as `kill PID` or a scheduler sends it): in training
or while the model is scored, the MLflow run ends KILLED, nothing is scored or registered (a
retraining promotes nothing), the command line prints one `stopped:` line naming the `--resume`
command and exits 130; that command then finishes the run into the same MLflow run."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.reliability.conftest import FAST_EVAL, PYTHON, TINY_FLOW, cli_flags, tally, wait_for


def _start(procs, module: str, args: list[str], mlflow_store: Path, **env: str):
    """The pipeline command ``python -m module args`` on this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    return procs.start([PYTHON, "-m", module, *args], env={
        **procs.env, "VAE_MLRUNS_DIR": str(mlflow_store), "PREFECT_API_URL": str(PREFECT_API_URL.value()), **env})


def _stop(proc, until, runs: Path) -> tuple[str, Path, str]:
    """SIGTERM once ``until()``; returns (run id, its last.pth, the last line of stderr) after
    checking exit code 130, a `stopped:` last line and no traceback."""
    assert wait_for(until, timeout=180, proc=proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # the CLI's own process
    tally("faults")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    (last,) = runs.glob("pipeline/*/*/last.pth")
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: "), err[-2000:]
    return last.parent.parent.name, last, last_line


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
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"
    flags = cli_flags({**TINY_FLOW, "num_epochs": 500, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "rel-sigterm", "iw_k": 4, "eval_max_images": 50})
    proc = _start(procs, "pipelines.training", ["--preset", "small", *flags], mlflow_store)
    run_id, last, last_line = _stop(proc, lambda: list(ckpt.glob("pipeline/*/*/last.pth")), ckpt)
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), last_line
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in last_line, last_line  # not the default folder
    client = tracking.get_client()
    _killed_with_nothing_registered(client, run_id)
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 500

    out = vae_training(resume_run_id=run_id, num_epochs=done + 1, overrides={"checkpoint_dir": str(ckpt)},
                       **FAST_EVAL, figures=False, tracking_wait_s=10)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"].startswith("KILLED: ")
    assert "test/iw_nll_k4" in run.data.metrics and out["model_version"]
    tally("runs_checked")


def _task_running(name: str) -> bool:
    """True while a task run called ``name-...`` is Running on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{name}-")))
    return any(r.state is not None and r.state.is_running() for r in runs)


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
    proc = _start(procs, "pipelines.training", ["--preset", "small", *flags], mlflow_store)
    run_id, last, last_line = _stop(proc, lambda: _task_running("evaluate"), ckpt)
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
    from tests.conftest import write_idx_dataset
    from vae.checkpoint import load_checkpoint

    data_dir = write_idx_dataset(tmp_path / "data", n_train=1100)  # the small preset holds out 1,000
    proc = _start(procs, "pipelines.retraining", ["--num_epochs", "500", "--iw_k", "4", "--eval_max_images", "50"],
                  mlflow_store, VAE_DATA_DIR=str(data_dir))
    ckpt = tmp_path / "checkpoints"  # the preset's folder, in the process's working directory
    run_id, last, last_line = _stop(proc, lambda: list(ckpt.glob("pipeline/*/*/last.pth")), ckpt)
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), last_line
    assert last_line.endswith(f"continue it with: python -m pipelines.retraining --resume {run_id}"), last_line
    client = tracking.get_client()
    _killed_with_nothing_registered(client, run_id)
    assert client.get_run(run_id).data.tags[tracking.TAG_RUN_KIND] == "retraining"

    done = load_checkpoint(last)["epoch"]
    out = vae_retraining(resume_run_id=run_id, overrides={"num_epochs": done + 1, "checkpoint_dir": str(ckpt),
                                                          "data_dir": str(data_dir)},
                         iw_k=4, eval_max_images=50, eval_probe=False, eval_fid=False, figures=False)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"].startswith("KILLED: ")
    assert out["decision"] == "promoted" and out["champion_version"] == out["challenger_version"]  # the first model
    assert client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION).run_id == run_id
    tally("runs_checked")
