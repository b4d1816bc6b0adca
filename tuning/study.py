"""Optuna studies: storage, sampler and pruner from options, the best trial's config, progress lines.

Storages (:mod:`tuning.storage`): any SQLAlchemy URL (SQLite by default, PostgreSQL via
``postgresql+psycopg://``) as an ``RDBStorage`` that retries database blips and has a heartbeat, so
a trial whose worker was killed is marked failed and run again; or ``journal:PATH``, Optuna's
lock-free file log.
Create the study once (:func:`open_study` with ``create=True``) before starting workers: several
processes creating one new SQLite database at once race on its schema.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuning.options import SweepError, SweepOptions, check_storage, default_storage, optuna_dir, redact
from tuning.sampling import TrialSeeded
from tuning.storage import open_storage
from vae.files import exclusive_file_lock, write_atomic

__all__ = ["open_storage", "open_study", "make_sampler", "make_pruner", "best_config", "best_config_path",
           "write_best_config", "trial_epochs", "ProgressPrinter", "STATE_NAMES"]

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
# Run-local keys a retraining run sets for itself.
_RUN_LOCAL_KEYS = {"experiment_name": None, "checkpoint_dir": "checkpoints", "progress": True, "sample_every": 5}


@contextlib.contextmanager
def _creation_lock(url: str):
    """For a SQLite URL, an exclusive file lock beside the database: sweeps started at once on a
    new database would otherwise race on creating its schema and study (one exits with an
    IntegrityError). Other storages serialise this themselves."""
    if not url.startswith("sqlite:///"):
        yield
        return
    path = Path(url[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_file_lock(path.with_name(path.name + ".lock")):
        yield


def open_study(opts: SweepOptions, worker: int = 0, *, create: bool = False) -> optuna.Study:
    """Create (``create=True``, once, before workers start) or load the study of ``opts``.

    Raises:
        SweepError: the storage cannot be opened, or the stored study has other directions.
    """
    if create:
        with _creation_lock(opts.storage_url):
            return _open_study(opts, worker, create=True)
    return _open_study(opts, worker, create=False)


def _open_study(opts: SweepOptions, worker: int, *, create: bool) -> optuna.Study:
    storage = open_storage(opts.storage_url, heartbeat_s=opts.heartbeat_s, grace_s=opts.grace_s,
                           retry_s=opts.storage_retry_s)
    kwargs = dict(storage=storage, study_name=opts.study_name, sampler=make_sampler(opts, worker),
                  pruner=make_pruner(opts))
    directions = ["minimize"] * len(opts.metrics)
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(**kwargs, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise SweepError(f"study {opts.study_name!r} exists with {len(study.directions)} objective(s); "
                         f"this sweep has {len(directions)}: use another --study-name")
    _name_metrics(study, opts)
    stored = study.user_attrs.get("metrics")
    if stored is None:
        study.set_user_attr("metrics", list(opts.metrics))
    elif stored != list(opts.metrics):
        raise SweepError(f"study {opts.study_name!r} optimises {stored}, not {list(opts.metrics)}: "
                         f"use another --study-name (values on different metrics do not compare)")
    return study


def _name_metrics(study: optuna.Study, opts: SweepOptions) -> None:
    """Label the objectives (``val/nelbo (nats per image)``) for optuna-dashboard, once per study."""
    if study.metric_names != opts.metric_names:
        with warnings.catch_warnings():  # set_metric_names is marked experimental since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(opts.metric_names)


def make_sampler(opts: SweepOptions, worker: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (default), random or NSGA-II; trial k draws from seed (``opts.seed``, k), so no worker,
    rerun or other machine repeats another's settings (:mod:`tuning.sampling`)."""

    def make(seed: int | None) -> optuna.samplers.BaseSampler:
        if opts.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=opts.population_size, seed=seed)
        if opts.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, opts.n_trials // 3)))

    return TrialSeeded(make, opts.seed)


def make_pruner(opts: SweepOptions) -> optuna.pruners.BasePruner:
    if opts.pruner == "median":
        # Epochs count from 1 and Optuna prunes at step >= n_warmup_steps: W warm-up epochs are never pruned.
        return optuna.pruners.MedianPruner(n_startup_trials=opts.pruner_startup_trials,
                                           n_warmup_steps=opts.pruner_warmup_epochs + 1)
    if opts.pruner == "hyperband":
        epochs = int(opts.base_config.get("num_epochs", 1))
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def trial_epochs(trials: list[FrozenTrial]) -> int:
    """Epochs trained by these trials (each epoch reports one intermediate value)."""
    return sum(len(t.intermediate_values) or int(t.user_attrs.get("epochs", 0)) for t in trials)


def best_config_path(study_name: str) -> Path:
    """``optuna/<study>/best_config.json``: the flat config of the study's best trial."""
    return optuna_dir() / study_name / "best_config.json"


def best_config(study_name: str, storage: str | None = None, *, experiment_name: str | None = None) -> dict[str, Any]:
    """The full flat config of a single-objective study's best trial, ready for ``VAETrainer``.

    Run-local keys (experiment name, checkpoint folder, progress bars, sample grids) are reset so
    a retraining run does not write into the trial's folder.

    Args:
        study_name: the study.
        storage: its storage URL (default: the embedded SQLite file).
        experiment_name: run name for the retrained model (default ``<study>-best``).
    Raises:
        SweepError: the study has no completed trial, or is multi-objective (no single best).
    """
    storage = check_storage(storage or default_storage())
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise SweepError(f"no study {study_name!r} in {redact(storage)}") from None
    if len(study.directions) > 1:
        raise SweepError(f"study {study_name!r} is multi-objective: pick a trial from its Pareto front")
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        raise SweepError(f"study {study_name!r} has no completed trial yet")
    config = dict(study.best_trial.user_attrs["config"])
    config.update({k: v for k, v in _RUN_LOCAL_KEYS.items() if v is not None})
    config["experiment_name"] = experiment_name or f"{study_name}-best"
    return config


def write_best_config(study_name: str, storage: str) -> Path | None:
    """Write :func:`best_config` to :func:`best_config_path` (atomically); None if no best yet."""
    try:
        config = best_config(study_name, storage)
    except SweepError:
        return None
    return write_atomic(best_config_path(study_name), json.dumps(config, indent=2) + "\n")


class ProgressPrinter:
    """A study callback printing one line per finished trial: state, value, best so far."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = STATE_NAMES.get(trial.state, trial.state.name.lower())
        epochs = len(trial.intermediate_values)
        if trial.values:
            value = ", ".join(f"{v:.3f}" for v in trial.values)
        elif trial.intermediate_values:
            value = f"{trial.intermediate_values[max(trial.intermediate_values)]:.3f} at epoch {epochs}"
        else:
            value = "-"
        line = f"{self.prefix}trial {trial.number:>3} {state:<8} value {value}"
        if len(study.directions) == 1:
            try:
                best = study.best_trial
                line += f" | best {best.value:.3f} (trial {best.number})"
            except ValueError:
                line += " | best -"
        else:
            line += f" | pareto front {len(study.best_trials)} trial(s)"
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        print(f"{line} | {params}", flush=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)
