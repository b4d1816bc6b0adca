"""The objective: a trial becomes a config dict, trained by the pipeline's own ``VAETrainer``.

Tracking and pruning attach to the trainer as callbacks: :class:`tracking.MLflowCallback`
logs each epoch to the trial's nested run, :class:`ReportCallback` reports the metric to Optuna
and raises ``optuna.TrialPruned`` from inside training when the pruner says so, so a pruned trial
stops at once. The metric does not depend on β (validation negative ELBO at β = 1, or the IW
bound), so trials with different β compare fairly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna

import tracking
from tuning import runs
from tuning.options import SweepOptions
from tuning.progress import TrialProgress
from tuning.space import suggest
from vae.config import flatten_params, validate_config
from vae.data import load_dataset
from vae.train import Callback, NonFiniteLossError, VAETrainer

__all__ = ["Objective", "ReportCallback", "SweepInterrupted"]


class SweepInterrupted(Exception):
    """A signal stopped a trial mid-training; the sweep ends and can be resumed.

    ``params`` holds the interrupted trial's parameters so the sweep can queue it again.
    """

    def __init__(self, message: str, number: int | None = None, params: dict[str, Any] | None = None):
        super().__init__(message)
        self.number, self.params = number, params


class ReportCallback(Callback):
    """Reports the objective metric each epoch; prunes when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        self.trial.set_user_attr("epochs", epoch)
        if not self.prune:
            return
        # A non-finite value is as bad as it gets: report it as +inf so the pruner stops it.
        self.trial.report(value if math.isfinite(value) else math.inf, epoch)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.metric} is {value} at epoch {epoch}")
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} = {value:.3f} at epoch {epoch}: worse than the pruner allows")


class Objective:
    """``study.optimize(Objective(opts, ...))``: returns the metric (or (recon, kl)) of a trial.

    Args:
        opts: the sweep's options (space, fixed config, metric).
        client, exp_id, parent_run_id: MLflow client, experiment and the sweep's parent run.
        progress, prefix: print each trial's start and epochs (:class:`tuning.progress.TrialProgress`),
            each line starting with ``prefix``.
    """

    def __init__(self, opts: SweepOptions, client, exp_id: str, parent_run_id: str, data=None, *,
                 progress: bool = False, prefix: str = ""):
        self.opts, self.client, self.exp_id, self.parent_run_id = opts, client, exp_id, parent_run_id
        self.progress, self.prefix = progress, prefix
        self.stop_reason: str | None = None  # set by a signal handler: start no more training
        self._data = None
        if data is not None:
            cfg = validate_config(opts.base_config)
            self._data = ((str(Path(cfg.data.data_dir).resolve()), cfg.data.dataset), data)

    def config_for(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's flat config: the base config with the sampled values and its own run folder."""
        cfg = {**self.opts.base_config, **suggest(trial, self.opts.space)}
        cfg.update(checkpoint_dir=self.opts.trials_dir, experiment_name=f"trial-{trial.number:04d}")
        return validate_config(cfg).to_dict()

    def __call__(self, trial: optuna.Trial):
        if self.stop_reason is not None:
            raise SweepInterrupted(f"stopped ({self.stop_reason}) before trial {trial.number} started")
        config = self.config_for(trial)
        trial.set_user_attr("config", config)
        cfg = validate_config(config)
        run_id = runs.start_trial_run(self.client, self.exp_id, self.parent_run_id, self.opts, trial.number,
                                      flatten_params(cfg))
        trial.set_user_attr("mlflow_run_id", run_id)
        callbacks = [tracking.MLflowCallback(self.client, run_id),
                     ReportCallback(trial, self.opts.metric, prune=not self.opts.multi_objective)]
        if self.progress:  # before the report, which may prune: the epoch's line comes first
            callbacks.insert(1, TrialProgress(trial.number, trial.params, self.opts.metrics[0], cfg.train.num_epochs,
                                              self.prefix))
        try:
            result = VAETrainer(cfg, callbacks, overwrite=True, data=self._dataset(cfg)).train()
        except optuna.TrialPruned as e:
            runs.end_trial_run(self.client, run_id, "pruned", reason=str(e))
            raise
        except NonFiniteLossError as e:  # diverged: a bad region of the space, not a broken sweep
            runs.end_trial_run(self.client, run_id, "pruned", reason=str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except (KeyboardInterrupt, SweepInterrupted):
            runs.end_trial_run(self.client, run_id, "interrupted", reason="interrupted")
            raise SweepInterrupted(f"trial {trial.number} interrupted", trial.number, trial.params) from None
        except BaseException as e:
            runs.end_trial_run(self.client, run_id, "failed", reason=f"{type(e).__name__}: {e}")
            raise
        if result["status"] == "stopped":
            runs.end_trial_run(self.client, run_id, "interrupted", reason=result["stop_reason"])
            raise SweepInterrupted(f"trial {trial.number} interrupted ({result['stop_reason']})", trial.number,
                                   trial.params)
        final = result["final_metrics"]
        values = {k: float(final[k]) for k in self.opts.metrics}
        runs.end_trial_run(self.client, run_id, "complete", values)
        out = tuple(values[k] for k in self.opts.metrics)
        return out if self.opts.multi_objective else out[0]

    def _dataset(self, cfg):
        """The dataset, read once per worker process and shared by its trials."""
        key = (str(Path(cfg.data.data_dir).resolve()), cfg.data.dataset)
        if self._data is None or self._data[0] != key:
            self._data = (key, load_dataset(cfg.data.data_dir, cfg.data.dataset))
        return self._data[1]
