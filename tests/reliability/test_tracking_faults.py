"""Pipelines and sweeps under faults: a diverging run ends FAILED in MLflow with its reason and
registers nothing; an unreachable tracking server fails a run fast, naming the server."""

from __future__ import annotations

import time

import pytest

from tests.reliability.conftest import FAST_EVAL, TINY_FLOW, tally
from tests.reliability.faultproxy import free_port


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
