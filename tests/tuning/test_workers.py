"""Sweeps across processes: several workers on one SQLite study, and resuming an interrupted one."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.tuning.conftest import popen
from tuning.options import SweepOptions
from tuning.sweep import run_sweep


def test_two_worker_processes_on_one_sqlite_study_finish_n_trials_without_duplicates(
        tiny_options, mlflow_runs, capfd):
    opts = tiny_options(n_trials=4, n_workers=2, fixed={"num_epochs": 1})
    assert opts.storage_url.startswith("sqlite:///")
    summary = run_sweep(opts)

    trials = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 and summary["counts"]["complete"] == 4
    out = capfd.readouterr().out
    assert "[worker 0] trial" in out and "[worker 1] trial" in out
    parents, runs = mlflow_runs()
    assert len(parents) == 1 and len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == ["0", "1", "2", "3"]


def _stop_during_second_trial(proc, study_name, storage, limit_s=120) -> str:
    """Wait for the first trial's progress line, then for the next trial to train; SIGTERM."""
    seen, deadline = [], time.monotonic() + limit_s
    while not any(line.startswith("trial ") for line in seen):
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise AssertionError("no progress line; output:\n" + "".join(seen))
        seen.append(line)
    # The study exists now: reading it cannot race its creation. Loaded once and polled (a fresh
    # load_study per poll took seconds on a loaded 2-core machine and missed every trial's window).
    study = optuna.load_study(study_name=study_name, storage=storage)
    while time.monotonic() < deadline and proc.poll() is None:
        last = study.get_trials(deepcopy=False)[-1]
        if last.state == TrialState.RUNNING and last.intermediate_values:  # mid-training
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return "".join(seen) + proc.communicate(timeout=120)[0]


def test_an_interrupted_sweep_resumes_with_earlier_trials_kept(tiny_options, mlflow_runs, tune_cmd):
    opts = tiny_options(n_trials=4, fixed={"num_epochs": 10})  # ~0.7 s an epoch: each trial trains for seconds
    fixed = [f"--set={k}={json.dumps(v)}" for k, v in opts.base_config.items()
             if k in ("data_dir", "hidden_dims", "batch_size", "num_epochs", "val_size", "ema_decay", "log_every")]
    argv, env = tune_cmd("--study-name", opts.study_name, "--n-trials", "4", "--preset", "default",
                         "--latent-dims", "2", "4", "--threads", "1", "--no-plots", *fixed)
    proc = popen(argv, env)
    try:
        out = _stop_during_second_trial(proc, opts.study_name, opts.storage_url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "rerun to resume" in out

    before = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    done = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    interrupted = [t for t in before if t.state == TrialState.FAIL]
    assert done and len(interrupted) == 1
    assert [t.state for t in before].count(TrialState.WAITING) == 1  # queued again

    # --n-trials counts finished trials: one more than done means exactly the queued retry runs.
    summary = run_sweep(SweepOptions(**{**opts.__dict__, "n_trials": len(done) + 1}))
    after = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    assert {t.number: t.value for t in after if t.number in done} == done  # earlier trials kept
    retried = [t for t in after if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == interrupted[0].params and summary["counts"]["complete"] == 1

    parents, runs = mlflow_runs()
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    states = {r.data.tags["optuna.trial_number"]: r.data.tags["trial_state"] for r in runs}
    assert states[str(interrupted[0].number)] == "interrupted"


def test_two_sweep_commands_started_at_once_on_a_new_sqlite_database_both_finish(tiny_options, tune_cmd):
    opts = tiny_options(n_trials=2, fixed={"num_epochs": 1})
    assert opts.storage_url.startswith("sqlite:///") and not Path(opts.storage_url[len("sqlite:///"):]).exists()
    fixed = [f"--set={k}={json.dumps(v)}" for k, v in opts.base_config.items()
             if k in ("data_dir", "hidden_dims", "batch_size", "num_epochs", "val_size", "ema_decay", "log_every")]
    argv, env = tune_cmd("--study-name", opts.study_name, "--n-trials", "2", "--preset", "default",
                         "--latent-dims", "2", "4", "--threads", "1", "--no-plots", *fixed)
    # Both create the database, its schema and the study; together they finish its 2 trials.
    procs = [popen(argv, env), popen(argv, env)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    trials = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params  # same --seed, different trials: different draws
