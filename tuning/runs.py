"""MLflow runs of a sweep: one parent run per invocation, one nested run per trial.

Names follow :mod:`tracking` (params ``section.key``, the library's metric keys,
``run_kind`` tags) and everything logs through ``MlflowClient`` with explicit run ids, so worker
processes and Prefect task threads attach their trials to the parent by its id alone.

A trial run ends ``FINISHED`` (complete), ``KILLED`` (pruned) or ``FAILED`` (failed or
interrupted); the tag ``trial_state`` says which in Optuna's words.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import tracking
from tuning.options import SweepOptions, redact

__all__ = ["start_parent_run", "start_trial_run", "end_trial_run", "close_orphaned_trial_runs",
           "close_dead_parent_runs", "log_summary", "TAG_TRIAL_STATE"]

TAG_PARENT = "mlflow.parentRunId"
TAG_STUDY = "optuna.study_name"
TAG_TRIAL_NUMBER = "optuna.trial_number"
TAG_TRIAL_STATE = "trial_state"  # complete | pruned | failed | interrupted
TAG_HOST, TAG_PID = "sweep.host", "sweep.pid"  # where the parent run's process lives
_RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "interrupted": "FAILED"}


def start_parent_run(client: MlflowClient, opts: SweepOptions) -> tuple[str, str]:
    """Create the experiment (if new) and the sweep's parent run; returns (experiment id, run id)."""
    exp_id = tracking.ensure_experiment(client, opts.experiment_name)
    run = client.create_run(exp_id, run_name=f"{opts.study_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        tracking.TAG_RUN_KIND: "sweep", TAG_STUDY: opts.study_name, "optuna.storage": redact(opts.storage_url),
        "optuna.sampler": opts.sampler, "optuna.pruner": opts.pruner, "optuna.metrics": ",".join(opts.metrics),
        TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())})
    params = {"sweep.n_trials": opts.n_trials, "sweep.n_workers": opts.n_workers, "sweep.seed": opts.seed,
              "sweep.timeout": opts.timeout, "sweep.objective": opts.objective,
              "sweep.multi_objective": opts.multi_objective,
              **{f"search.{k}": spec.describe() for k, spec in opts.space.items()}}
    tracking.log_params(client, run.info.run_id, params)
    return exp_id, run.info.run_id


def start_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, opts: SweepOptions, number: int,
                    params: Mapping[str, Any]) -> str:
    """A nested run for trial ``number`` with the trial's full config as flat params."""
    run = client.create_run(exp_id, run_name=f"trial-{number:04d}", tags={
        TAG_PARENT: parent_run_id, tracking.TAG_RUN_KIND: "trial", TAG_STUDY: opts.study_name,
        TAG_TRIAL_NUMBER: str(number)})
    tracking.log_params(client, run.info.run_id, params)
    return run.info.run_id


def end_trial_run(client: MlflowClient, run_id: str, state: str, values: Mapping[str, float] | None = None,
                  reason: str | None = None) -> None:
    """End a trial run with its state (complete / pruned / failed / interrupted) and final values."""
    if values:
        tracking.log_metrics(client, run_id, {f"objective/{k}": v for k, v in values.items()})
    client.set_tag(run_id, TAG_TRIAL_STATE, state)
    if reason:
        client.set_tag(run_id, "trial_state_reason", reason[:5000])
    client.set_terminated(run_id, status=_RUN_STATUS[state])


def close_orphaned_trial_runs(client: MlflowClient, trials) -> int:
    """End FAILED the runs of trials Optuna failed while their MLflow run still says RUNNING
    (a killed worker never ends its run; the heartbeat check fails its trial). Returns how many.
    Runs this tracking store does not hold (a worker elsewhere tracked them) are left to their store."""
    closed = 0
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state.name == "FAIL" and run_id and _status(client, run_id) == "RUNNING":
            end_trial_run(client, run_id, "failed", reason="its worker died (trial failed by Optuna's heartbeat check)")
            closed += 1
    return closed


def _status(client: MlflowClient, run_id: str) -> str | None:
    try:
        return client.get_run(run_id).info.status
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def close_dead_parent_runs(client: MlflowClient, exp_id: str, study_name: str) -> int:
    """End KILLED the parent runs of ``study_name`` left RUNNING by a sweep process that no longer exists.

    Only runs started on this host are judged (by their pid); sweeps running on other machines
    against the same study are left alone. Returns how many were closed.
    """
    host, closed = socket.gethostname(), 0
    for run in client.search_runs([exp_id], filter_string=(
            f"tags.{tracking.TAG_RUN_KIND} = 'sweep' and tags.`{TAG_STUDY}` = '{study_name}' "
            f"and attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'")):
        pid = run.data.tags.get(TAG_PID, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "sweep.end_reason", f"its process (pid {pid}) died without ending it")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed += 1
    return closed


def log_summary(client: MlflowClient, run_id: str, summary: Mapping[str, Any], plots: Mapping[str, str],
                best_config_path: str | None, status: str = "FINISHED") -> None:
    """Best trial, counts, plots and the best config on the parent run; then end it."""
    best = summary.get("best")
    if best:
        tracking.log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items()})
        tracking.log_metrics(client, run_id, {"best/value": best["value"], "best/trial_number": best["number"]})
        client.set_tag(run_id, "best_trial_run_id", best.get("mlflow_run_id") or "")
    counts = {f"trials/{k}": v for k, v in summary["counts"].items()}
    tracking.log_metrics(client, run_id, {**counts, "trials/epochs": summary["trial_epochs"],
                                          "sweep/wall_s": summary["wall_s"]})
    if summary.get("pareto"):
        client.log_dict(run_id, summary["pareto"], "pareto_front.json")
    for path in plots.values():
        client.log_artifact(run_id, path, artifact_path="plots")
    if best_config_path:
        client.log_artifact(run_id, best_config_path)
    client.set_terminated(run_id, status=status)
