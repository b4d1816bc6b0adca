"""Fixtures for the sweep tests: an isolated Optuna folder, tiny sweep options, store readers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sweep_mlflow_store(tmp_path_factory) -> Path:
    """One MLflow store for the sweep tests (creating its schema costs seconds); every test
    works in its own experiment, named after its own study."""
    return tmp_path_factory.mktemp("sweep_mlruns")


@pytest.fixture
def study_name(request) -> str:
    """A study (and MLflow experiment) name unique to the test."""
    return "t-" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60] + "-" + uuid.uuid4().hex[:6]


@pytest.fixture
def optuna_dir(tmp_path, monkeypatch, sweep_mlflow_store) -> Path:
    """A fresh ``VAE_OPTUNA_DIR`` (default storage, trial folders, best configs), the shared store."""
    path = tmp_path / "optuna"
    monkeypatch.setenv("VAE_OPTUNA_DIR", str(path))
    monkeypatch.setenv("VAE_MLRUNS_DIR", str(sweep_mlflow_store))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything relative lands in the test's folder
    return path


@pytest.fixture
def tiny_fixed(tiny_config) -> dict:
    """Fixed keys that make each trial a ~1 s tiny model on the tiny dataset."""
    keys = ("data_dir", "hidden_dims", "batch_size", "num_epochs", "val_size", "ema_decay", "log_every")
    return {k: tiny_config[k] for k in keys}


@pytest.fixture
def tiny_options(optuna_dir, tiny_fixed, study_name):
    """``tiny_options(**overrides)``: checked SweepOptions for a sweep of tiny trials (one torch
    thread: on a shared CPU several threads per tiny model are far slower, not faster)."""
    from tuning.options import make_options

    def make(**kw):
        fixed = {**tiny_fixed, **kw.pop("fixed", {})}
        for key, value in {"latent_dims": [2, 4], "study_name": study_name, "n_trials": 3, "preset": "default",
                           "threads": 1, "plots": False}.items():
            kw.setdefault(key, value)
        return make_options(fixed=fixed, **kw)

    return make


@pytest.fixture
def mlflow_runs(optuna_dir, study_name):
    """``mlflow_runs()``: the (parent, trial runs) of this test's experiment."""
    from tracking import get_client

    def read():
        client = get_client()
        exp = client.get_experiment_by_name(study_name)
        runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
        return ([r for r in runs if r.data.tags.get("run_kind") == "sweep"],
                [r for r in runs if r.data.tags.get("run_kind") == "trial"])

    return read


@pytest.fixture
def tune_cmd():
    """``tune_cmd(*args)``: argv of ``python -m tuning`` in a child process, with its env."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cmd(*args: str) -> tuple[list[str], dict]:
        return [sys.executable, "-m", "tuning", *args], env

    return cmd


def popen(argv, env, **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
