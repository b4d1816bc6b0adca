"""The pipeline's Prefect tasks: each a thin, typed wrapper around one library call.

- ``prepare_data``: locate, verify (IDX header, sizes, SHA-256) and cache a dataset as tensors;
  its result is cached by the input digest (:func:`data_cache_key`).
- ``catch_up``: deliver what earlier runs kept while the server was away, end runs whose process
  died (:func:`pipelines.sync.catch_up`).
- ``start_run`` / ``reopen_run`` / ``finish_run``: the MLflow run (params, tags, dataset input)
  around the rest; ``reopen_run`` takes a failed run up again (``--resume RUN_ID``).
- ``train``: :class:`vae.train.VAETrainer` with :class:`tracking.MLflowCallback`.
- ``evaluate``: :func:`evaluate_model` (:func:`vae.evaluate.evaluate` under the run's config, on
  the fast path when the config's ``fast`` is on) on the test set; metrics to the run.
- ``figures``: :func:`vae.figures.write_figures` into the run's ``figures/``.
- ``summary``: Prefect artifacts summarising the run: markdown (metrics, what the likelihoods
  mean, MLflow link, the figures as images or openable paths) and a table of the metrics.
- ``register``: :func:`pipelines.registry.log_and_register`.

Tasks retry on transient I/O errors (``OSError``) only: a bad config, bad data or a full or
read-only disk fails at once.
All MLflow calls go through ``MlflowClient`` with the run id (tasks run in worker threads). What a
run logs after its start (tags, metrics, figures, checkpoints, its end) goes through the run's
outbox (:mod:`tracking.outbox`): a background sender posts it, so training never waits on the
tracking server, and what the server missed is delivered when it is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from torch import nn

import tracking
from pipelines import registry, sync
from tracking.outbox import FINAL_ERRORS, short_http_requests
from vae import fast, settings
from vae.callbacks import on_signals
from vae.checkpoint import load_model
from vae.config import Config, flatten_params, validate_config
from vae.data import FILES, ImageData, load_dataset
from vae.device import get_device
from vae.evaluate import evaluate as vae_evaluate
from vae.figures import write_figures
from vae.errors import Interrupted, UserError
from vae.files import StorageError, atomic_write, storage_fault
from vae.train import RESUMABLE_OVERRIDES, VAETrainer

DATA_CACHE_VERSION = 1  # bump when the cached tensors' layout changes


def transient_io_error(task, task_run, state) -> bool:
    """Retry condition: the task failed with an ``OSError`` (network, locked file), but not a full,
    read-only or forbidden disk (:func:`vae.files.storage_fault`), which no retry can fix."""
    try:
        state.result()
    except OSError as e:
        return storage_fault(e) is None
    except BaseException:  # noqa: BLE001 - anything else (bad config, bad data, bugs) is final
        return False
    return False


RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_io_error)


def _cache_root() -> Path:
    return settings.current().cache_dir


def data_cache_key(context, parameters: dict[str, Any]) -> str:
    """Digest of the task's inputs: dataset, resolved folder, and each data file's size and mtime.

    A changed, added or removed file changes the key; the content itself is hashed (and checked
    against SHA256SUMS) on every cache miss.
    """
    root = Path(parameters["data_dir"]).expanduser().resolve()
    parts = [f"v{DATA_CACHE_VERSION}", parameters["dataset"], str(root), str(_cache_root().resolve())]
    for folder in (root / "MNIST" / "raw", root / "FashionMNIST" / "raw", root):
        for name in [*FILES.values(), *(f"{n}.gz" for n in FILES.values()), "SHA256SUMS"]:
            path = folder / name
            if path.is_file():
                st = path.stat()
                parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "prepare-data-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@task(name="prepare-data", cache_key_fn=data_cache_key, persist_result=True, result_serializer="json", **RETRY)
def prepare_data(data_dir: str, dataset: str) -> dict[str, Any]:
    """Verify a dataset and cache its tensors; returns a small JSON-able reference to them.

    Raises:
        DataError: files missing (with where to put them) or invalid (file and problem named).
    """
    data = load_dataset(data_dir, dataset)
    path = _cache_root() / "tensors" / f"{dataset}-{data.digest[:16]}.pt"
    if not path.is_file():
        with atomic_write(path) as f:
            torch.save({k: getattr(data, k) for k in ("train_images", "train_labels", "test_images", "test_labels")}, f)
    return {"dataset": dataset, "data_dir": str(Path(data_dir).expanduser().resolve()), "digest": data.digest,
            "sha256": data.sha256, "tensors": str(path), "num_train": len(data.train_images),
            "num_test": len(data.test_images)}


def load_data(ref: dict[str, Any]) -> ImageData:
    """The dataset a :func:`prepare_data` result refers to (its cached tensors, weights_only)."""
    try:
        t = torch.load(ref["tensors"], weights_only=True)
    except (OSError, RuntimeError, EOFError):  # cache file gone or damaged: read the IDX files again
        return load_dataset(ref["data_dir"], ref["dataset"])
    return ImageData(t["train_images"], t["train_labels"], t["test_images"], t["test_labels"], ref["sha256"],
                     ref["dataset"])


@task(name="start-run", cache_policy=NO_CACHE, **RETRY)
def start_run(config: dict[str, Any], data_ref: dict[str, Any], run_kind: str, flow_run_id: str | None) -> dict[str, str]:
    """Create the MLflow run: params ``section.key``, the standard tags, the dataset as input."""
    cfg = validate_config(config)
    client = tracking.get_client()
    exp_id = tracking.ensure_experiment(client, cfg.run.experiment_name)
    tags = {**tracking.environment_tags(str(get_device(cfg.run.device)), data_ref["digest"], run_kind, flow_run_id),
            **tracking.process_tags()}
    run = client.create_run(exp_id, tags=tags)
    tracking.log_params(client, run.info.run_id, flatten_params(cfg))
    tracking.log_dataset(client, run.info.run_id, data_ref["dataset"], data_ref["digest"], data_ref["data_dir"],
                         {"num_train": data_ref["num_train"], "num_test": data_ref["num_test"], **data_ref["sha256"]})
    return {"run_id": run.info.run_id, "experiment_id": exp_id, "run_name": run.info.run_name,
            "artifact_uri": run.info.artifact_uri}


@task(name="catch-up", cache_policy=NO_CACHE, **RETRY)
def catch_up(checkpoint_dir: str, experiment_name: str) -> str | None:
    """Deliver the outboxes earlier runs left and end the runs whose process died (one line, or None)."""
    line = sync.catch_up(tracking.get_client(), checkpoint_dir, experiment_name)
    if line:
        print(line)
    return line


class TrainingStopped(Interrupted):
    """A signal (SIGTERM, Ctrl-C) stopped training cleanly: ``last.pth`` records the exact batch.
    The flow then ends the run ``KILLED`` without scoring or registering the partial model."""


class EvaluationStopped(Interrupted):
    """A signal (SIGTERM, Ctrl-C) arrived while a trained run was being scored. The flow ends the
    run ``KILLED`` and registers nothing; ``--resume`` finds its training complete and scores it."""


def stop_on_signals(what: str, then: str) -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM and SIGINT raise :class:`EvaluationStopped` ("``what`` stopped
    (SIGTERM); ``then``") in the main thread; in a deployment's worker thread nothing changes."""

    def handler(sig: signal.Signals) -> None:
        raise EvaluationStopped(f"{what} stopped ({sig.name}); {then}")

    return on_signals(handler)


class ResumeError(UserError, ValueError):
    """``--resume RUN_ID`` names a run that cannot be continued (unknown, running, no checkpoint)."""


def resumed_config(run_id: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config of pipeline run ``run_id`` (its ``config.json`` under the ``checkpoint_dir`` of
    ``overrides``, else :func:`pipelines.sync.default_checkpoint_dir`), with the ``overrides`` a
    resumed run may change (``num_epochs``, ``device``, ...) applied.

    Raises:
        ResumeError: no checkpoint of that run is there.
    """
    checkpoint_dir = str((overrides or {}).get("checkpoint_dir") or sync.default_checkpoint_dir())
    found = sorted(sync.run_folder(checkpoint_dir, run_id).glob("*/last.pth"))
    if not found:
        raise ResumeError(f"cannot resume run {run_id}: no {sync.run_folder(checkpoint_dir, run_id)}/<experiment>/"
                          f"last.pth (was it started with another --checkpoint_dir?)")
    stored = json.loads((found[0].parent / "config.json").read_text())
    given = {k: v for k, v in (overrides or {}).items() if k in RESUMABLE_OVERRIDES and k != "checkpoint_dir"}
    return validate_config({**stored, **given, "checkpoint_dir": checkpoint_dir}).to_dict()


@task(name="reopen-run", cache_policy=NO_CACHE, **RETRY)
def reopen_run(run_id: str, run_kind: str, checkpoint_dir: str) -> dict[str, str]:
    """Take up run ``run_id`` again (``RUNNING``, this process's tags); the flow continues it.

    Raises:
        ResumeError: no such run, its process is still running it, or the other flow must continue
            it (a retraining's challenger is decided on after training; another run is not).
    """
    client = tracking.get_client()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ResumeError(f"cannot resume run {run_id}: the tracking store {client.tracking_uri} "
                          f"has no such run") from None
    if run.info.status == "RUNNING" and not tracking.process_died(run.data.tags):
        raise ResumeError(f"cannot resume run {run_id}: it is RUNNING in process "
                          f"{run.data.tags.get(tracking.TAG_PROCESS_PID, '?')} on "
                          f"{run.data.tags.get(tracking.TAG_PROCESS_HOST, '?')}")
    kind = run.data.tags.get(tracking.TAG_RUN_KIND, "")
    if sync.resuming_flow(kind) != sync.resuming_flow(run_kind):
        what = "a retraining's challenger" if kind == "retraining" else f"a {kind or 'pipeline'} run"
        raise ResumeError(f"cannot resume run {run_id} here: it is {what}; continue it with: "
                          f"{sync.resume_command(run_id, checkpoint_dir, kind)}")
    reason = run.data.tags.get(tracking.TAG_FAILURE_REASON)
    client.update_run(run_id, status="RUNNING")
    for key, value in {**tracking.process_tags(), "resumed_from": f"{run.info.status}: {reason or ''}"[:5000]}.items():
        client.set_tag(run_id, key, value)
    if reason is not None:  # it is running again: a reason would now mislead
        client.delete_tag(run_id, tracking.TAG_FAILURE_REASON)
    return {"run_id": run_id, "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
            "artifact_uri": run.info.artifact_uri}


def run_sender(checkpoint_dir: str, run_id: str):
    """The sender of pipeline run ``run_id``'s outbox (in :func:`pipelines.sync.run_folder`),
    started if need be: one per run in this process, shared by its tasks."""
    return sender_in(sync.run_folder(checkpoint_dir, run_id), run_id)


def sender_in(folder: str | Path, run_id: str):
    """:func:`run_sender` given the run folder itself (the ``train`` task's ``checkpoint_dir``)."""
    return tracking.open_sender(folder, run_id, tracking.get_client(check=False), sync.HANDLERS)


def run_outbox(checkpoint_dir: str, run_id: str) -> tracking.Outbox:
    """The outbox of pipeline run ``run_id``, its sender started (:func:`run_sender`)."""
    return run_sender(checkpoint_dir, run_id).outbox


def sync_command(checkpoint_dir: str) -> str:
    """The command that delivers what the runs under ``checkpoint_dir`` left in their outboxes."""
    return f"python -m pipelines.sync --checkpoint_dir {checkpoint_dir}"


def unreachable_line(run_id: str, checkpoint_dir: str, error: str | None) -> str:
    return (f"MLflow tracking server {tracking.tracking_uri()} did not take the last updates of run {run_id} "
            f"({error or 'no answer'}); they are kept in {sync.run_folder(checkpoint_dir, run_id)} and "
            f"`{sync_command(checkpoint_dir)}` (or the next pipeline run) delivers them")


@task(name="finish-run", cache_policy=NO_CACHE, **RETRY)
def finish_run(run_id: str, checkpoint_dir: str, status: str = "FINISHED", reason: str | None = None,
               wait_s: float = 20.0) -> str | None:
    """End the run through its outbox, and wait up to ``wait_s`` for the sender to deliver it all.

    Returns:
        None when everything arrived; else the one line saying the server is away and how the
        rest gets there (also printed).
    """
    sender = run_sender(checkpoint_dir, run_id)
    try:
        if reason:  # a FAILED run says why, in MLflow itself
            sender.outbox.set_tag(run_id, tracking.TAG_FAILURE_REASON, reason[:5000])
        sender.outbox.set_terminated(run_id, status=status)
    except StorageError:  # the outbox's disk is full or read-only: end the run directly
        sender.close(wait_s)
        client = tracking.get_client(check=False)
        if reason:
            client.set_tag(run_id, tracking.TAG_FAILURE_REASON, reason[:5000])
        client.set_terminated(run_id, status=status)
        return None
    if sender.close(wait_s):
        return None
    line = unreachable_line(run_id, checkpoint_dir, sender.last_error)
    print(line)
    return line


@task(name="train", cache_policy=NO_CACHE, **RETRY)
def train(config: dict[str, Any], data_ref: dict[str, Any], run_id: str, resume_command: str) -> dict[str, Any]:
    """Train with per-epoch metrics and the checkpoints logged to the run.

    The run folder is ``<checkpoint_dir>/<experiment>/``, chosen per run by the flow; a retry
    after an I/O error resumes from its ``last.pth`` exactly. A stop request raises
    :class:`TrainingStopped`, whose message ends with ``resume_command``.
    """
    cfg = validate_config(config)
    last = Path(cfg.run.checkpoint_dir) / cfg.run.experiment_name / "last.pth"
    # The flow gives each run the folder <checkpoint_dir>/pipeline/<run id>: the outbox's too.
    outbox = sender_in(cfg.run.checkpoint_dir, run_id).outbox
    callback = tracking.MLflowCallback(outbox, run_id, log_checkpoints=True)
    trainer = VAETrainer(cfg, [callback], resume=last.is_file(), data=load_data(data_ref))
    result = trainer.train()
    if result["stop_reason"] is not None:  # also a signal after the last step: stop before scoring
        raise TrainingStopped(f"training stopped ({result['stop_reason']}) after {result['epochs_completed']} of "
                              f"{cfg.train.num_epochs} epochs; continue it with: {resume_command}")
    return {k: result[k] for k in ("status", "stop_reason", "run_dir", "epochs_completed", "best_val_nelbo",
                                   "best_model_path", "final_metrics", "history")}


def on_fast_path(model: nn.Module, cfg: Config) -> nn.Module:
    """``model`` with :func:`vae.fast.accelerate` applied when the config's ``fast`` is on (the
    same function, computed faster); a plain model otherwise."""
    return fast.accelerate(model, enabled=cfg.run.fast)


def evaluate_model(model: nn.Module, data: ImageData, cfg: Config, *, k: int, max_test_images: int = 0,
                   max_train_images: int = 0, probe: bool = True, fid: bool = True) -> dict[str, float]:
    """The test metrics (``test/nelbo``, ``test/iw_nll_k{k}``, ...) of one model under a config.

    The config gives the likelihood, the binarisation, the seed and the fast path (``fast``,
    ``retain_memory``); the training run's own model and a champion scored again use this one
    protocol. Stage lines and bars go to stderr when it is a terminal and the config's
    ``progress`` is on (a flow run from a shell shows them; a worker's log does not).

    Args:
        k: importance samples of the IW bound.
        max_test_images, max_train_images: evaluate on the first N test images, fit the probe on
            the first N training images (0 = all).
        probe, fid: compute the linear probe and the classifier FID.
    """
    return vae_evaluate(on_fast_path(model, cfg), data, loss_type=cfg.loss.reconstruction_loss_type,
                        binarize=cfg.data.binarize, k=k, probe=probe, fid=fid, max_test_images=max_test_images,
                        max_train_images=max_train_images, seed=cfg.run.seed,
                        retain_memory=cfg.run.fast and cfg.run.retain_memory,
                        progress=None if cfg.run.progress else False)


def score_key(k: int) -> str:
    """The metric the registry compares models on: the test IW bound (lower is better)."""
    return f"test/iw_nll_k{k}"


@task(name="evaluate", cache_policy=NO_CACHE, **RETRY)
def evaluate(model_path: str, config: dict[str, Any], data_ref: dict[str, Any], run_id: str | None, *,
             k: int, max_test_images: int = 0, max_train_images: int = 0, probe: bool = True,
             fid: bool = True) -> dict[str, float]:
    """Evaluate a checkpoint on the test set (:func:`evaluate_model`); log the metrics to ``run_id``
    (None: log nothing)."""
    cfg = validate_config(config)
    model, _ = load_model(model_path, get_device(cfg.run.device))
    metrics = evaluate_model(model, load_data(data_ref), cfg, k=k, max_test_images=max_test_images,
                             max_train_images=max_train_images, probe=probe, fid=fid)
    if run_id is not None:
        tracking.log_metrics(run_outbox(cfg.run.checkpoint_dir, run_id), run_id, metrics)
    return metrics


FIGURES_DIR = "figures"  # artifact folder: figures/<name>.png, the same in every run


@task(name="figures", cache_policy=NO_CACHE, **RETRY)
def figures(model_path: str, config: dict[str, Any], data_ref: dict[str, Any], run_id: str,
            history: list[dict[str, Any]]) -> dict[str, str]:
    """Write every figure and log it under ``figures/`` of the run; returns {name: artifact path}."""
    cfg = validate_config(config)
    model, _ = load_model(model_path, get_device(cfg.run.device))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_figures(on_fast_path(model, cfg), load_data(data_ref), history, tmp,
                              loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize, seed=cfg.run.seed)
        run_outbox(cfg.run.checkpoint_dir, run_id).log_artifacts(run_id, tmp, FIGURES_DIR)
    return {name: f"{FIGURES_DIR}/{Path(p).name}" for name, p in paths.items()}


@task(name="summary", cache_policy=NO_CACHE, **RETRY)
def summary(run: dict[str, str], config: dict[str, Any], metrics: dict[str, float], figures: dict[str, str],
            protocol: str = "") -> str:
    """Publish the run's summary as Prefect artifacts: markdown (metrics, what the score means,
    MLflow link, the figures) and a table of the metrics."""
    cfg = validate_config(config)
    markdown = summary_markdown(tracking.get_client(check=False), run, cfg, metrics, figures, protocol)
    create_markdown_artifact(key="vae-training-summary", markdown=markdown,
                             description=f"VAE training run {run['run_id']}")
    create_table_artifact(key="vae-training-metrics", description=f"test metrics of MLflow run {run['run_id']}",
                          table=[{"metric": k, "value": round(v, 6)} for k, v in sorted(metrics.items())])
    return markdown


def summary_markdown(client, run: dict[str, str], cfg, metrics: dict[str, float], figures: dict[str, str],
                     protocol: str = "") -> str:
    """The markdown artifact. Figures: inline images served by the tracking server, or the local
    files' paths (a browser showing the Prefect UI cannot load a local file into the page)."""
    link = tracking.run_link(client, run["experiment_id"], run["run_id"])
    rows = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in sorted(metrics.items()))
    links = {name: tracking.artifact_location(client.tracking_uri, run["artifact_uri"], run["run_id"], path)
             if "artifact_uri" in run else tracking.artifact_link(client, run["run_id"], path)
             for name, path in figures.items()}
    if not links:
        figs = "Figures: none (figures were off)\n"
    elif all(u.startswith(("http://", "https://")) for u in links.values()):
        figs = "## Figures\n\n" + "\n\n".join(f"![{name}]({u})" for name, u in links.items()) + "\n"
    else:
        figs = "## Figures (files)\n\n" + "\n".join(f"- {name}: `{u}`" for name, u in links.items()) + "\n"
    score = f"Likelihoods: {protocol}.\n\n" if protocol else ""
    return (f"# VAE training run `{run['run_name']}`\n\n"
            f"MLflow run: [{run['run_id']}]({link}) (experiment `{cfg.run.experiment_name}`)\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\n{score}{figs}")


@task(name="register", cache_policy=NO_CACHE, **RETRY)
def register(model_path: str, config: dict[str, Any], run_id: str, score: dict[str, float], run_kind: str = "",
             wait_s: float = 20.0) -> dict[str, str] | None:
    """Log the model, register a ``vae-mnist`` version, alias it ``challenger``: once the run's
    outbox has delivered everything before it (up to ``wait_s``). A server away then gets it
    queued in the outbox instead, after the rest (also when it goes away during the registration:
    delivering the record registers the run's model once); returns None in that case."""
    sender = run_sender(validate_config(config).run.checkpoint_dir, run_id)
    tags = {tracking.TAG_RUN_KIND: run_kind, **{k: f"{v:.6g}" for k, v in score.items()}}
    if sender.flush(wait_s):
        try:
            with short_http_requests():  # a server lost now: queued at once, not after MLflow's retries
                version = registry.log_and_register(tracking.get_client(), run_id, model_path, config, tags=tags)
            return {"name": version.name, "version": str(version.version), "uri": registry.model_uri(version)}
        except MlflowException as e:
            if e.error_code in FINAL_ERRORS:
                raise
        except tracking.TrackingUnavailableError:
            pass
    sender.outbox.append({"op": "register", "run_id": run_id, "model_path": str(Path(model_path).resolve()),
                          "config": config, "tags": tags, "queued_at": time.time()})
    return None


@task(name="tag-run", cache_policy=NO_CACHE, **RETRY)
def tag_run(run_id: str, checkpoint_dir: str, tags: dict[str, str]) -> None:
    outbox = run_outbox(checkpoint_dir, run_id)
    for key, value in tags.items():
        outbox.set_tag(run_id, key, value)
