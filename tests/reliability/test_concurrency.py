"""Concurrent use: two training flows and a two-worker sweep at once on one new MLflow store and
one SQLite study record every run and trial, and no run overwrites another's artifacts; a killed
sweep worker leaves its trial failed (then retried) and the study usable."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import FAST_EVAL, PYTHON, cli_env, tally, wait_for

TINY = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "val_size": 100, "progress": False,
        "sample_every": 0, "ema_decay": 0.9, "log_every": 5, "max_train_samples": 0}


def _sweep_flags(data_dir: Path, study: str, epochs: int) -> list[str]:
    sets = {**{k: v for k, v in TINY.items() if k != "latent_dim"}, "data_dir": str(data_dir), "num_epochs": epochs}
    flags = ["--study-name", study, "--no-plots", "--pruner", "none", "--latent-dims", "2", "4"]
    for k, v in sets.items():
        flags += ["--set", f"{k}={json.dumps(v)}"]
    return flags


@pytest.fixture
def shared_env(tmp_path, prefect_harness) -> dict[str, str]:
    """One MLflow store, one Optuna folder and the session's Prefect server for every process."""
    from prefect.settings import PREFECT_API_URL

    return cli_env(tmp_path, VAE_MLRUNS_DIR=str(tmp_path / "mlruns"), VAE_OPTUNA_DIR=str(tmp_path / "optuna"),
                   PREFECT_API_URL=str(PREFECT_API_URL.value()))


@pytest.mark.slow
def test_two_flows_and_a_sweep_at_once_record_everything(procs, tmp_path, tiny_data_dir, shared_env, monkeypatch):
    import optuna
    from optuna.trial import TrialState

    ck = tmp_path / "checkpoints"
    flow_args = [{"overrides": {**TINY, "num_epochs": 2, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ck),
                                "experiment_name": "rel-concurrent", "seed": seed}, **FAST_EVAL, "figures": False}
                 for seed in (1, 2)]
    started = [procs.start([PYTHON, "-m", "tests.reliability._flow_driver", json.dumps(a)], env=shared_env)
               for a in flow_args]
    started.append(procs.start([PYTHON, "-m", "tuning", "--n-trials", "4", "--n-workers", "2",
                                *_sweep_flags(tiny_data_dir, "rel-concurrent", 1)], env=shared_env))
    outputs = [p.communicate(timeout=400) for p in started]
    for p, (out, err) in zip(started, outputs):
        assert p.returncode == 0, f"{p.args[:4]}\n{out[-2000:]}\n{err[-4000:]}"

    monkeypatch.setenv("VAE_MLRUNS_DIR", shared_env["VAE_MLRUNS_DIR"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import tracking

    client = tracking.get_client()
    results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outputs[:2]]
    flow_runs = [client.get_run(r["run_id"]) for r in results]
    assert len({r.info.run_id for r in flow_runs}) == 2
    for run in flow_runs:
        assert run.info.status == "FINISHED"
        assert run.data.metrics.get("val/nelbo") is not None
        tally("runs_checked")
    # artifacts: each run's own folder, each checkpoint folder distinct, nothing shared
    uris = {r.info.artifact_uri for r in flow_runs}
    assert len(uris) == 2
    listed = [{a.path for a in client.list_artifacts(r.info.run_id)} for r in flow_runs]
    assert all(listed), listed
    ck_dirs = {r.data.tags[tracking.TAG_CHECKPOINT_DIR] for r in flow_runs}
    assert len(ck_dirs) == 2 and all(Path(d, "rel-concurrent", "best_model.pth").is_file() for d in ck_dirs)
    versions = client.search_model_versions(f"name='{tracking.MODEL_NAME}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in flow_runs)
    assert len({v.source for v in versions}) == 2

    # the sweep: 4 trials in the study, each with its own finished nested MLflow run
    study = optuna.load_study(study_name="rel-concurrent",
                              storage=f"sqlite:///{tmp_path / 'optuna' / 'studies.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == 4
    for t, rid in zip(trials, run_ids):
        run = client.get_run(rid)
        assert run.info.status == "FINISHED" and run.data.metrics["val/nelbo"] == pytest.approx(
            t.intermediate_values.get(1, run.data.metrics["val/nelbo"]))
        tally("trials_checked")
    trial_dirs = {t.user_attrs["config"]["experiment_name"] for t in trials}
    assert len(trial_dirs) == 4
    parents = {client.get_run(rid).data.tags["mlflow.parentRunId"] for rid in run_ids}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.status == "FINISHED"
    tally("runs_checked")


def test_killed_sweep_worker_leaves_its_trial_failed_and_the_study_usable(procs, tmp_path, tiny_data_dir, monkeypatch):
    import optuna
    from optuna.trial import TrialState

    env = cli_env(tmp_path, VAE_MLRUNS_DIR=str(tmp_path / "mlruns"), VAE_OPTUNA_DIR=str(tmp_path / "optuna"))
    url = f"sqlite:///{tmp_path / 'optuna' / 'studies.db'}"
    flags = _sweep_flags(tiny_data_dir, "rel-killed", 5)
    proc = procs.start([PYTHON, "-m", "tuning", "--n-trials", "3", *flags], env=env)

    def running() -> bool:
        """A trial is RUNNING and has reported an epoch (read-only: never races the schema's creation)."""
        db = tmp_path / "optuna" / "studies.db"
        if not db.exists():
            return False
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute("SELECT count(*) FROM trials t JOIN trial_intermediate_values v "
                                   "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'").fetchone()[0] > 0
        except sqlite3.Error:  # tables not there yet
            return False

    assert wait_for(running, timeout=180, interval=0.3, proc=proc), proc.communicate()[1][-3000:]
    procs.kill(proc)  # SIGKILL mid-trial: no handler runs, nothing is cleaned up
    proc.communicate(timeout=30)
    tally("faults")

    # The trial's heartbeat stops. The project's storage fails it after a 60 s grace period; the
    # same storage with a 1 s grace shows what happens then without waiting a minute.
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1,
                                         heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    study = optuna.load_study(study_name="rel-killed", storage=storage)
    (killed,) = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    time.sleep(1.5)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed.number] == TrialState.FAIL, states
    assert TrialState.WAITING in states.values(), "the failed trial was not queued again"

    # The study is usable: the same command resumes, runs the retry, and finishes (--n-trials counts
    # finished trials: one more than those finished before the kill is exactly the retry).
    done = sum(s == TrialState.COMPLETE for s in states.values())
    res = procs.run([PYTHON, "-m", "tuning", "--n-trials", str(done + 1), *flags], env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="rel-killed", storage=url).get_trials()
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    retry = [t for t in trials if t.number != killed.number and t.params == killed.params]
    assert retry and retry[0].state == TrialState.COMPLETE, [(t.number, t.state, t.params) for t in trials]
    tally("trials_checked", len(trials))

    # MLflow: the killed trial's run must not stay RUNNING forever once its trial is FAIL
    monkeypatch.setenv("VAE_MLRUNS_DIR", env["VAE_MLRUNS_DIR"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import tracking

    client = tracking.get_client()
    killed_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status != "RUNNING", "the killed trial's MLflow run still says RUNNING"
    # ... nor the killed sweep's parent run: the next sweep on this machine saw its process gone.
    parents = client.search_runs([killed_run.info.experiment_id], filter_string="tags.run_kind = 'sweep'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    assert parents[0].info.status == "KILLED", "the killed sweep's parent run still says RUNNING"
    assert "died" in parents[0].data.tags["sweep.end_reason"]
    assert parents[1].info.status == "FINISHED"
