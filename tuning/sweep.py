"""Running a sweep: create the study once, run its trials in one or several processes, summarise.

:func:`run_sweep` is what the CLI and the ``vae-sweep`` flow call. It creates the study (so
workers never race on a new database), opens the MLflow parent run, runs trials until the study
holds ``n_trials`` finished ones (:mod:`tuning.budget`; in this process, or in ``n_workers`` worker
processes that load the same study and attach their trial runs to the parent by id), then logs the best trial, the plots and the best
config (``optuna/<study>/best_config.json``) on the parent run. An interrupted sweep keeps its
finished trials, queues the interrupted one again, and resumes when run again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

import tracking
from tuning import runs
from tuning.objective import Objective, SweepInterrupted
from tuning.budget import FINISHED, StopAtTotal, needed
from tuning.options import SweepError, SweepOptions, optuna_dir, redact
from tuning.plots import save_study_plots
from tuning.progress import progress_wanted
from tuning.storage import quiet_storage_failures, storage_error_in
from tuning.study import STATE_NAMES, ProgressPrinter, open_study, trial_epochs, write_best_config
from vae.config import validate_config
from vae.data import load_dataset

__all__ = ["run_sweep", "run_worker"]


def run_sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run trials of ``opts.study_name`` until it holds ``opts.n_trials`` finished ones; returns the summary.

    Raises:
        SweepError: the storage holds an incompatible study.
        StorageError: the storage cannot be opened, or stayed unreachable longer than ``storage_retry_s``.
        DataError: the dataset is missing (checked before any trial starts).
    """
    started, t0 = dt.datetime.now(), time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines replace Optuna's INFO lines
    cfg = validate_config(opts.base_config)
    data = load_dataset(cfg.data.data_dir, cfg.data.dataset)  # fail now, not in every trial
    study = open_study(opts, create=True)
    client = tracking.get_client()
    runs.close_orphaned_trial_runs(client, study.get_trials(deepcopy=False))
    exp_id, parent = runs.start_parent_run(client, opts)
    runs.close_dead_parent_runs(client, exp_id, opts.study_name)  # sweeps killed outright on this machine
    link = tracking.run_link(client, exp_id, parent)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"sweep {opts.study_name}: {finished} of {opts.n_trials} trial(s) finished in {redact(opts.storage_url)}; "
          f"the rest on {opts.n_workers} worker(s); MLflow run {link}", flush=True)
    status = "FINISHED"
    try:
        with _sigterm_as_interrupt():  # SIGTERM, like Ctrl-C, ends the sweep cleanly (and its workers)
            if opts.n_workers == 1:
                run_worker(opts, worker=0, exp_id=exp_id, parent_run_id=parent, data=data)
            else:
                del data
                _run_workers(opts, exp_id, parent, max(0, opts.n_trials - finished))
    except (SweepInterrupted, KeyboardInterrupt):
        status = "KILLED"
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    runs.close_orphaned_trial_runs(client, study.get_trials(deepcopy=False))  # workers killed during this sweep
    summary = _summarise(study, opts, started, time.perf_counter() - t0, exp_id, parent, link)
    summary["interrupted"] = status == "KILLED"
    plots = {}
    if opts.plots:
        plots = save_study_plots(study, optuna_dir() / opts.study_name / "plots", opts.metrics,
                                 str(opts.base_config.get("loss_type", "vae")))
    summary["plots"] = plots
    runs.log_summary(client, parent, summary, plots, summary["best_config_path"], status)
    _print_summary(summary)
    return summary


def run_worker(opts: SweepOptions, *, worker: int, exp_id: str, parent_run_id: str, data=None,
               prefix: str = "", max_trials: int | None = None) -> None:
    """Run trials of the (existing) study in this process until it holds ``opts.n_trials`` finished
    ones, or this worker has finished ``max_trials`` (its share of a multi-worker sweep).

    Raises:
        SweepInterrupted: a signal stopped a trial (it is queued again for the next run).
        StorageError: the storage stayed unreachable (the running trial is retried by heartbeat).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_storage_failures()  # a storage that gave up is one line, not Optuna's traceback and ours
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    study = open_study(opts, worker)
    say = lambda text: print(prefix + text, flush=True)  # noqa: E731
    heartbeat = not opts.storage_url.startswith("journal:")
    todo = needed(study, opts.n_trials, say=say, heartbeat=heartbeat)
    if max_trials is not None:
        todo = min(todo, max_trials)
    if todo == 0:
        say("no trial left for this worker" if max_trials == 0 else
            f"the study holds {opts.n_trials} finished trial(s): nothing to run (raise --n-trials for more)")
        return
    objective = Objective(opts, tracking.get_client(), exp_id, parent_run_id, data=data,
                          progress=progress_wanted(opts.progress), prefix=prefix)
    stop = StopAtTotal(opts.n_trials, max_failures=todo, say=say, heartbeat=heartbeat, cap=max_trials)
    try:
        with _graceful_stop(study, objective):
            study.optimize(objective, n_trials=None, timeout=opts.timeout, catch=(RuntimeError, ValueError),
                           callbacks=[ProgressPrinter(prefix), stop])
        if objective.stop_reason is not None:  # a signal arrived between trials: the last one finished
            raise SweepInterrupted(f"stopped ({objective.stop_reason})")
    except (SweepInterrupted, KeyboardInterrupt) as e:
        params = getattr(e, "params", None)
        if params:  # run the interrupted trial again when the sweep resumes
            study.enqueue_trial(params, user_attrs={"retry_of": e.number})
        print(f"{prefix}interrupted: finished trials are kept; run the same command again to resume", flush=True)
        raise SweepInterrupted(str(e) or "interrupted") from None
    except Exception as e:
        error = storage_error_in(e)  # Optuna may raise another error while handling the storage's
        if error is None:
            raise
        raise error from None


class _graceful_stop:
    """SIGINT/SIGTERM outside training: finish the current step, start no new trial.

    Inside training the trainer's own handler stops the epoch (the trial is queued again); between
    trials this sets ``objective.stop_reason`` and ``study.stop()``. A second Ctrl-C interrupts at once.
    """

    def __init__(self, study: optuna.Study, objective: Objective):
        self.study, self.objective, self.previous = study, objective, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.objective.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.objective.stop_reason = signal.Signals(signum).name
        try:
            self.study.stop()
        except RuntimeError:  # not inside optimize() yet or any more: the flag is enough
            pass


def _run_workers(opts: SweepOptions, exp_id: str, parent_run_id: str, missing: int) -> None:
    """Split the ``missing`` trials over ``n_workers`` processes (torch threads: cores / workers each).

    Each worker runs at most its share, so a worker that starts late still gets trials and an
    early one cannot race it for the last ones (a retry the survivors cannot fit is the next run's).
    """
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.n_workers)
    spec = json.loads(opts.to_json())
    spec["threads"] = threads
    # Workers import the very code this process runs, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    procs = []
    for w in range(opts.n_workers):
        share = missing // opts.n_workers + (w < missing % opts.n_workers)
        cmd = [sys.executable, "-m", "tuning.worker", "--worker", str(w), "--max-trials", str(share),
               "--exp-id", exp_id, "--parent-run-id", parent_run_id, "--options", json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C or SIGTERM here: let every worker stop its trial cleanly
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    if any(c == 130 for c in codes):
        raise SweepInterrupted("a worker was interrupted")
    if 2 in codes:
        raise SweepError(f"worker exit codes {codes}: a worker stopped on the error printed above")
    if any(codes):
        raise RuntimeError(f"worker exit codes {codes}: see their output above")


class _sigterm_as_interrupt:
    """SIGTERM outside training raises KeyboardInterrupt (the trainer handles it inside)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _summarise(study: optuna.Study, opts: SweepOptions, started: dt.datetime, wall_s: float, exp_id: str,
               parent: str, link: str) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    ours = [t for t in trials if t.datetime_start is not None and t.datetime_start >= started]
    counts = {name: sum(t.state == state for t in ours) for state, name in STATE_NAMES.items()}
    summary: dict[str, Any] = {
        "study_name": opts.study_name, "storage": redact(opts.storage_url), "experiment_id": exp_id,
        "parent_run_id": parent, "mlflow_link": link, "metrics": list(opts.metrics), "counts": counts,
        "n_trials_run": len(ours), "n_trials_total": len(trials), "trial_epochs": trial_epochs(ours),
        "wall_s": round(wall_s, 2), "best": None, "pareto": None, "best_config_path": None,
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and not opts.multi_objective:
        b = study.best_trial
        summary["best"] = {"number": b.number, "value": b.value, "params": b.params,
                           "mlflow_run_id": b.user_attrs.get("mlflow_run_id")}
        path = write_best_config(opts.study_name, opts.storage_url)
        summary["best_config_path"] = str(path) if path else None
    elif complete:
        summary["pareto"] = [{"number": t.number, "values": dict(zip(opts.metrics, t.values)), "params": t.params,
                              "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in study.best_trials]
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    c = s["counts"]
    print(f"done: {s['n_trials_run']} trial(s) ({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed), "
          f"{s['trial_epochs']} trial-epochs, {s['wall_s']:.1f} s; {s['n_trials_total']} in the study"
          + (" [interrupted: rerun to resume]" if s.get("interrupted") else ""))
    if s["best"]:
        b = s["best"]
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items())
        print(f"best: trial {b['number']} {s['metrics'][0]} = {b['value']:.3f} | {params}")
        print(f"best config: {s['best_config_path']}")
    for p in s["pareto"] or []:
        vals = ", ".join(f"{k}={v:.3f}" for k, v in p["values"].items())
        print(f"pareto: trial {p['number']} {vals} | {p['params']}")
    print(f"MLflow: {s['mlflow_link']}", flush=True)
