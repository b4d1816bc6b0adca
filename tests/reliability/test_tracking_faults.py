"""Pipelines and sweeps under faults: a diverging run ends FAILED in MLflow with its reason and
registers nothing; a run stopped with SIGTERM, in training or while it is scored, ends KILLED,
scores and registers nothing, and ``--resume`` finishes it; an unreachable tracking server fails
a run fast, naming the server."""

from __future__ import annotations

import signal
import time

import pytest

from tests.reliability.conftest import PYTHON, cli_flags, tally, wait_for
from tests.reliability.faultproxy import free_port

TINY_FLOW = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "num_epochs": 2, "val_size": 100,
             "progress": False, "sample_every": 0, "ema_decay": 0.9, "log_every": 1}
FAST_EVAL = {"iw_k": 4, "eval_max_images": 50, "eval_probe": False, "eval_fid": False}


def test_diverging_flow_run_ends_failed_with_the_reason_and_registers_nothing(prefect_harness, mlflow_store,
                                                                              tiny_data_dir, tmp_path):
    import tracking
    from pipelines.training import vae_training

    overrides = {**TINY_FLOW, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(tmp_path / "ck"),
                 "experiment_name": "rel-nan", "learning_rate": 10.0, "max_grad_norm": 0.0, "weight_decay": 0.0}
    tally("faults")
    state = vae_training(overrides=overrides, **FAST_EVAL, return_state=True)
    assert state.is_failed()
    assert "NaN or infinite" in state.message and "step" in state.message
    client = tracking.get_client()
    (run,) = client.search_runs([client.get_experiment_by_name("rel-nan").experiment_id])
    assert run.info.status == "FAILED"
    reasons = " ".join(f"{k}={v}" for k, v in run.data.tags.items() if not k.startswith("mlflow.source"))
    assert "NaN or infinite" in reasons, f"the FAILED run does not say why: {run.data.tags}"
    assert f"python -m pipelines.training --resume {run.info.run_id}" in run.data.tags[tracking.TAG_FAILURE_REASON]
    assert client.search_registered_models() == []
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
    tally("runs_checked")


def test_sigterm_stops_a_pipeline_run_killed_with_nothing_scored_and_resume_finishes_it(
        prefect_harness, mlflow_store, procs, tiny_data_dir, tmp_path):
    """`vae-pipeline` on SIGTERM: the step finishes, `last.pth` is saved, the MLflow run ends KILLED
    with how to continue, the partial model is neither scored nor registered, exit 130 with one
    line; `--resume RUN_ID` then trains the rest into the same run and registers it."""
    from prefect.settings import PREFECT_API_URL

    import tracking
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"
    flags = cli_flags({**TINY_FLOW, "num_epochs": 500, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "rel-sigterm", "iw_k": 4, "eval_max_images": 50})
    proc = procs.start([PYTHON, "-m", "pipelines.training", "--preset", "small", *flags],
                       env={**procs.env, "VAE_MLRUNS_DIR": str(mlflow_store),
                            "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    found = wait_for(lambda: list(ckpt.glob("pipeline/*/rel-sigterm/last.pth")), timeout=120, proc=proc)
    assert found, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # the CLI's own process, as `kill PID` or a scheduler sends it
    tally("faults")
    out, err = proc.communicate(timeout=120)
    (last,) = ckpt.glob("pipeline/*/rel-sigterm/last.pth")
    run_id, done = last.parent.parent.name, load_checkpoint(last)["epoch"]
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), err[-2000:]
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in last_line, last_line  # not the default folder
    assert "Traceback" not in out + err, err[-3000:]
    client = tracking.get_client()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags[tracking.TAG_FAILURE_REASON]
    assert not [k for k in run.data.metrics if k.startswith("test/")], run.data.metrics
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
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
    from prefect.settings import PREFECT_API_URL

    import tracking
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"  # an evaluation that takes minutes: k = 20,000 samples per image
    flags = cli_flags({**TINY_FLOW, "num_epochs": 1, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "rel-sigterm-eval", "iw_k": 20000, "eval_max_images": 200})
    proc = procs.start([PYTHON, "-m", "pipelines.training", "--preset", "small", *flags],
                       env={**procs.env, "VAE_MLRUNS_DIR": str(mlflow_store),
                            "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    assert wait_for(lambda: _task_running("evaluate"), timeout=180, proc=proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    tally("faults")
    out, err = proc.communicate(timeout=60)
    (last,) = ckpt.glob("pipeline/*/rel-sigterm-eval/last.pth")
    run_id = last.parent.parent.name
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: scoring the trained model stopped (SIGTERM); nothing was registered"), \
        err[-2000:]
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in last_line and "Traceback" not in out + err, err[-3000:]
    client = tracking.get_client()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags[tracking.TAG_FAILURE_REASON]
    assert not [k for k in run.data.metrics if k.startswith("test/")], run.data.metrics
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
    assert load_checkpoint(last)["epoch"] == 1  # training had finished

    out = vae_training(resume_run_id=run_id, overrides={"checkpoint_dir": str(ckpt)}, **FAST_EVAL, figures=False,
                       tracking_wait_s=10)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED" and out["model_version"]
    assert run.data.tags["resumed_from"].startswith("KILLED: ") and "test/iw_nll_k4" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "val/nelbo")] == [1]  # no epoch trained again
    tally("runs_checked")


def test_sigterm_stops_a_nightly_retraining_with_nothing_registered_or_promoted(
        prefect_harness, mlflow_store, procs, tmp_path):
    """`python -m pipelines.retraining` (what the nightly deployment runs) on SIGTERM: the
    challenger's run ends KILLED, nothing is registered or promoted, exit 130 with one line."""
    from prefect.settings import PREFECT_API_URL

    import tracking
    from tests.conftest import write_idx_dataset

    data_dir = write_idx_dataset(tmp_path / "data", n_train=1100)  # the small preset holds out 1,000

    proc = procs.start([PYTHON, "-m", "pipelines.retraining", "--num_epochs", "500", "--iw_k", "4",
                        "--eval_max_images", "50"],
                       env={**procs.env, "VAE_MLRUNS_DIR": str(mlflow_store), "VAE_DATA_DIR": str(data_dir),
                            "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    ckpt = tmp_path / "checkpoints"  # the preset's folder, in the process's working directory
    found = wait_for(lambda: list(ckpt.glob("pipeline/*/*/last.pth")), timeout=180, proc=proc)
    assert found, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    tally("faults")
    out, err = proc.communicate(timeout=120)
    (last,) = ckpt.glob("pipeline/*/*/last.pth")
    run_id = last.parent.parent.name
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: training stopped (SIGTERM) after "), err[-2000:]
    assert f"--resume {run_id}" in last_line and "Traceback" not in out + err, err[-3000:]
    client = tracking.get_client()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.TAG_RUN_KIND] == "retraining", run.data.tags
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
    assert client.search_registered_models() == []  # so no alias either: nothing was promoted
    tally("runs_checked")


def test_unreachable_tracking_server_fails_a_flow_fast_naming_it(prefect_harness, monkeypatch, tiny_data_dir, tmp_path):
    from pipelines.training import vae_training

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = {**TINY_FLOW, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(tmp_path / "ck"),
                 "experiment_name": "rel-unreachable"}
    tally("faults")
    t0 = time.monotonic()
    state = vae_training(overrides=overrides, **FAST_EVAL, return_state=True)
    elapsed = time.monotonic() - t0
    assert state.is_failed()
    assert uri in state.message, state.message
    assert elapsed < 30, f"took {elapsed:.0f} s to give up on an unreachable server"
    assert not (tmp_path / "ck").exists(), "training started although nothing could be tracked"


def test_unreachable_tracking_server_fails_a_sweep_fast_naming_it(monkeypatch, tiny_data_dir, tmp_path, capsys):
    from tuning.__main__ import cli

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VAE_OPTUNA_DIR", str(tmp_path / "optuna"))
    tally("faults")
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as info:
        cli(["--n-trials", "1", "--study-name", "rel-unreachable", "--set", f"data_dir={tiny_data_dir}",
             "--set", "num_epochs=1", "--set", "max_train_samples=0", "--set", "val_size=100", "--no-plots"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert uri in err and "Traceback" not in err, err[-2000:]
    assert elapsed < 30, f"took {elapsed:.0f} s to give up on an unreachable server"


def test_unreachable_tracking_server_fails_the_pipeline_cli_with_one_line(prefect_harness, monkeypatch, tiny_data_dir,
                                                                          tmp_path, capsys):
    from pipelines.training import cli

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tally("faults")
    with pytest.raises(SystemExit) as info:
        cli(["--preset", "small", "--data_dir", str(tiny_data_dir), "--checkpoint_dir", str(tmp_path / "ck"),
             "--max_train_samples", "0", "--val_size", "100", "--num_epochs", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert uri in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "ck").exists(), "training started although nothing could be tracked"
