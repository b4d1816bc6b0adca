"""The scale-out path on one machine: a sweep's worker processes share one Optuna study in
PostgreSQL and log their trials to one MLflow tracking server backed by PostgreSQL.

Tests run in file order: the last one takes the module's stack down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import pg_connect
from tests.scale.conftest import ROOT

pytestmark = pytest.mark.postgres


def tiny_sweep_args(data_dir: Path) -> list[str]:
    """A sweep whose trials train for about a second each (the tiny dataset, 1 epoch)."""
    fixed = {"data_dir": str(data_dir), "hidden_dims": [8, 16], "batch_size": 50, "num_epochs": 1,
             "val_size": 100, "max_train_samples": 0, "ema_decay": 0.9, "log_every": 5}
    args = ["--latent-dims", "2", "4", "--pruner", "none", "--threads", "1", "--no-plots"]
    for key, value in fixed.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def run_sweep(stack, tmp_path: Path, study: str, n_trials: int, n_workers: int, data_dir: Path):
    env = {**stack.client_env(), "VAE_OPTUNA_DIR": str(tmp_path / "optuna"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # No --storage and no tracking URI on the command line: the stack's env file is the whole setup.
    cmd = [sys.executable, "-m", "tuning", "--study-name", study, "--n-trials", str(n_trials),
           "--n-workers", str(n_workers), *tiny_sweep_args(data_dir)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_env_file_points_clients_at_the_stack(mlflow_stack):
    env = mlflow_stack.client_env()
    assert env["MLFLOW_TRACKING_URI"] == mlflow_stack.mlflow_url
    assert env["VAE_OPTUNA_STORAGE"] == mlflow_stack.optuna_url
    assert "PREFECT_API_URL" not in (mlflow_stack.dir / "env").read_text()  # --no-prefect


def test_sweep_over_three_workers_lands_in_postgres_and_on_the_tracking_server(mlflow_stack, tmp_path,
                                                                               tiny_data_dir):
    from mlflow.tracking import MlflowClient

    proc = run_sweep(mlflow_stack, tmp_path, "scale-six", n_trials=6, n_workers=3, data_dir=tiny_data_dir)

    # Every worker process ran trials of the one study.
    workers = set(re.findall(r"^\[worker (\d+)\] trial +\d+ complete", proc.stdout, re.M))
    assert workers == {"0", "1", "2"}, proc.stdout[-3000:]

    # Six distinct, complete trials in the Optuna database in PostgreSQL.
    with pg_connect(f"{mlflow_stack.prefix}_optuna") as conn:
        rows = conn.execute("SELECT t.number, t.state FROM trials t JOIN studies s USING (study_id) "
                            "WHERE s.study_name = %s", ("scale-six",)).fetchall()
    assert sorted(n for n, _ in rows) == list(range(6))
    assert {str(state).split(".")[-1] for _, state in rows} == {"COMPLETE"}

    # Six nested trial runs under one parent run on the tracking server ...
    client = MlflowClient(tracking_uri=mlflow_stack.mlflow_url)
    exp = client.get_experiment_by_name("scale-six")
    parents = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == list(range(6))
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert all("val/nelbo" in r.data.metrics for r in trials)

    # ... whose backend store is the PostgreSQL database, and whose artifact store is the stack's folder.
    with pg_connect(f"{mlflow_stack.prefix}_mlflow") as conn:
        (n_runs,) = conn.execute("SELECT count(*) FROM runs WHERE experiment_id = %s",
                                 (int(exp.experiment_id),)).fetchone()
    assert n_runs == 7
    uploaded = [p for p in (mlflow_stack.dir / "mlflow" / "artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "best_config.json" for p in uploaded), uploaded


def test_status_then_down_stops_only_what_up_started(mlflow_stack):
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not the stack's
    try:
        status = mlflow_stack.sh("status")
        assert re.search(r"^mlflow +\d+ +running", status.stdout, re.M), status.stdout
        leaders = [int(p.read_text().split()[0]) for p in (mlflow_stack.dir / "pids").glob("*.pid")]
        assert leaders
        # Each service runs in its own process group (the MLflow server forks uvicorn): all must go.
        pids = [int(pid) for leader in leaders
                for pid in subprocess.run(["pgrep", "-g", str(leader)], capture_output=True, text=True).stdout.split()]
        assert set(leaders) <= set(pids) and len(pids) > len(leaders)

        mlflow_stack.sh("down")

        assert all(not _alive(pid) for pid in pids)
        assert bystander.poll() is None
        assert mlflow_stack.sh("status", check=False).returncode != 0
    finally:
        bystander.kill()
        bystander.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until its parent reaps it: count it as stopped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")
