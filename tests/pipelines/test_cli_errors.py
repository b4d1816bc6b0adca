"""A user's mistake through any pipeline command is one ``error:`` message and exit code 2: no
Prefect traceback, no log line; a bug keeps its traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pipelines.console import UserErrorFilter, hide_user_error_tracebacks
from tests.pipelines.conftest import TINY
from vae.data import DataError

ROOT = Path(__file__).resolve().parents[2]
TINY_FLAGS = [f"--{k}={' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY.items()
              if k not in ("hidden_dims", "progress")]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_every_entry_point_prints_one_error_line_for_bad_input(client, mlflow_store, tmp_path):
    missing = tmp_path / "nowhere"
    env = {**os.environ, "VAE_MLRUNS_DIR": str(mlflow_store), "VAE_OPTUNA_DIR": str(tmp_path / "optuna"),
           "VAE_DATA_DIR": str(missing), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # no flow may start
    commands = {  # all at once: each is a Python start-up importing torch, MLflow and Prefect
        "demo": ["pipelines.demo"],
        "vae-pipeline": ["pipelines.training", "--data_dir", str(missing)],
        "retrain": ["pipelines.retraining"],
        "sweep": ["tuning", "--n-trials", "1", "--study-name", "t"],
        "sweep bad key": ["tuning", "--n-trials", "1", "--study-name", "t", "--set", "latnet_dim=3"],
    }
    procs = {name: _start(args, env) for name, args in commands.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        first, *rest = out.strip().splitlines()
        # One message: its first line, and the indented lines of the same message (the files to provide).
        assert proc.returncode == 2 and first.startswith("error: "), (name, out)
        assert all(line.startswith("  ") for line in rest), (name, out)
        assert ("latnet_dim" if "key" in name else f"mnist data not found in {missing}") in first, (name, out)


def test_a_user_error_inside_the_flow_shows_no_traceback(prefect_harness, client, mlflow_store, tiny_data_dir,
                                                         tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "VAE_MLRUNS_DIR": str(mlflow_store), "PREFECT_API_URL": PREFECT_API_URL.value()}
    # Valid data and config; the trainer finds that 600 images leave none for training.
    proc = _start(["pipelines.training", "--data_dir", str(tiny_data_dir), "--checkpoint_dir", str(tmp_path / "ck"),
                   *TINY_FLAGS, "--hidden_dims", "8", "16", "--val_size", "600", "--iw_k", "2", "--no_register"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "Encountered exception" not in out and "Finished in state Failed" not in out
    assert out.strip().splitlines()[-1].startswith("error: val_size 600 leaves no training images"), out


def _record(name: str, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, exc_info)


def test_the_filter_drops_user_errors_of_run_loggers_only():
    keep = UserErrorFilter().filter
    assert not keep(_record("prefect.task_runs", "Task run failed with exception", DataError("no data")))
    assert not keep(_record("prefect.flow_runs", "Encountered exception during execution", DataError("no data")))
    assert not keep(_record("prefect.task_runs", "Finished in state Failed('Task run encountered an exception "
                                                 "DataError: mnist data not found')"))
    assert keep(_record("prefect.task_runs", "Task run failed with exception", RuntimeError("a bug")))
    assert keep(_record("prefect.flow_runs", "Finished in state Failed('... RuntimeError: a bug')"))
    assert keep(_record("mlflow", "something", DataError("not a run logger")))


def test_the_filter_sits_on_prefects_console_handler_once():
    from prefect.logging.handlers import PrefectConsoleHandler

    hide_user_error_tracebacks()
    hide_user_error_tracebacks()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles and all(sum(isinstance(f, UserErrorFilter) for f in h.filters) == 1 for h in consoles)
