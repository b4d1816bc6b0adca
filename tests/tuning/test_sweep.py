"""Sweeps in this process: trials in storage, nested MLflow runs, pruning, objectives, best config."""

from __future__ import annotations

import dataclasses
import json

import optuna
from optuna.trial import TrialState

from tuning.study import best_config, open_study
from tuning.sweep import run_sweep
from vae.config import validate_config


def test_three_trial_sweep_leaves_three_trials_and_three_nested_runs(tiny_options, mlflow_runs):
    opts = tiny_options(n_trials=3, plots=True)
    summary = run_sweep(opts)

    study = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(len(t.intermediate_values) == 2 for t in study.trials)  # one report per epoch
    parents, trials = mlflow_runs()
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.tags["trial_state"] for r in trials} == {"complete"}
    assert all(r.info.status == "FINISHED" and "model.latent_dim" in r.data.params for r in trials)
    assert parent.data.metrics["best/value"] == study.best_value == summary["best"]["value"]
    assert parent.data.params["best.latent_dim"] == str(study.best_params["latent_dim"])
    assert len(summary["plots"]) == 4  # history, importances, parallel coordinates, contour


def test_best_config_is_the_best_trials_config_ready_to_train(tiny_options):
    opts = tiny_options(n_trials=2)
    summary = run_sweep(opts)
    config = best_config(opts.study_name, opts.storage_url)
    written = json.loads(open(summary["best_config_path"]).read())
    assert written == config and validate_config(config)
    study = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url)
    for key, value in study.best_params.items():
        assert config[key] == value
    assert config["experiment_name"] == f"{opts.study_name}-best" and config["checkpoint_dir"] == "checkpoints"


def test_a_trial_reporting_a_bad_value_is_pruned_at_once(tiny_options, mlflow_runs):
    # Two good trials set the median; a learning rate of 1e-7 barely moves the model.
    opts = tiny_options(n_trials=3, lr_range=[1e-7, 3e-3], pruner_startup_trials=2, fixed={"num_epochs": 3})
    study = open_study(opts, create=True)
    for lr in (3e-3, 3e-3, 1e-7):
        study.enqueue_trial({"learning_rate": lr, "latent_dim": 4, "beta": 1.0})
    run_sweep(opts)

    trials = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert list(trials[2].intermediate_values) == [1]  # stopped after its first epoch, not 3
    pruned = [r for r in mlflow_runs()[1] if r.data.tags["optuna.trial_number"] == "2"][0]
    assert (pruned.info.status, pruned.data.tags["trial_state"]) == ("KILLED", "pruned")


def test_multi_objective_sweep_reports_a_pareto_front_without_pruning(tiny_options, mlflow_runs):
    opts = tiny_options(n_trials=2, multi_objective=True, fixed={"num_epochs": 1}, plots=True)
    summary = run_sweep(opts)
    study = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url)
    assert [len(t.values) for t in study.trials] == [2, 2]
    assert summary["pareto"] and set(summary["pareto"][0]["values"]) == {"val/recon", "val/kl"}
    assert "pareto_front" in summary["plots"]


def test_iw_objective_minimises_the_iw_bound(tiny_options):
    opts = tiny_options(n_trials=1, objective="iw", iw_k=2, fixed={"num_epochs": 1})
    summary = run_sweep(opts)
    run = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials[0]
    assert summary["metrics"] == ["val/iw_nll_k2"] and run.value == summary["best"]["value"]


def test_journal_storage_resumes_and_adds_trials(tiny_options, tmp_path):
    opts = tiny_options(n_trials=1, storage=f"journal:{tmp_path / 'studies.log'}", fixed={"num_epochs": 1})
    first = run_sweep(opts)
    second = run_sweep(dataclasses.replace(opts, n_trials=2))
    assert (first["n_trials_total"], second["n_trials_total"]) == (1, 2)


def test_n_trials_counts_finished_trials_and_a_rerun_never_repeats_settings(tiny_options):
    opts = tiny_options(n_trials=2, sampler="random", fixed={"num_epochs": 1})
    run_sweep(opts)
    again = run_sweep(opts)  # the study already holds 2 finished trials
    assert (again["n_trials_run"], again["n_trials_total"]) == (0, 2)
    more = run_sweep(dataclasses.replace(opts, n_trials=4))
    assert (more["n_trials_run"], more["n_trials_total"]) == (2, 4)
    trials = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    # The same --seed on a study that has trials continues the sampler instead of replaying it.
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4, [t.params for t in trials]


def test_warm_up_epochs_are_never_pruned(tiny_options):
    from tuning.study import make_pruner

    study = optuna.create_study(pruner=make_pruner(tiny_options(pruner_startup_trials=0, pruner_warmup_epochs=1)))
    for value in (1.0, 1.0):
        trial = study.ask()
        trial.report(value, 1)
        trial.report(value, 2)
        study.tell(trial, value)
    worse = study.ask()
    worse.report(100.0, 1)
    assert not worse.should_prune()  # epoch 1 is warm-up
    worse.report(100.0, 2)
    assert worse.should_prune()
