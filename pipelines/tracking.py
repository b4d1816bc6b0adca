"""MLflow conventions shared by the pipelines and the tuning package: one place for names.

- Where runs go: ``$MLFLOW_TRACKING_URI`` when set (a tracking server, PostgreSQL, ...), else a
  SQLite store inside ``mlruns/`` of the working directory (``mlruns/mlflow.db``, artifacts in
  ``mlruns/artifacts``): the local backend MLflow 3 recommends, with the model registry.
- What runs are called: params ``<section>.<key>`` (``model.latent_dim``, ``loss.beta_end``),
  metrics as the library names them (``train/loss``, ``val/nelbo``, ``test/iw_nll_k1000``),
  the tags below, the registered model ``vae-mnist`` with aliases ``champion``/``challenger``.

MLflow's active run is per thread and Prefect tasks run in worker threads, so everything here
logs through ``MlflowClient`` with an explicit run id, never the fluent ``mlflow.log_*`` API.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from vae import settings
from vae.train import Callback

MODEL_NAME = "vae-mnist"
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GIT_COMMIT = "git_commit"
TAG_DATASET_DIGEST = "dataset_digest"
TAG_DEVICE = "device"
TAG_TORCH_VERSION = "torch_version"
TAG_FLOW_RUN_ID = "prefect_flow_run_id"
TAG_RUN_KIND = "run_kind"  # training | retraining | sweep | trial
TAG_CHECKPOINT_DIR = "checkpoint_dir"
# The retraining decision, set on the challenger's run (and its model version).
TAG_DECISION = "retrain.decision"  # promoted | kept
TAG_DECISION_REASON = "retrain.reason"
TAG_FAILURE_REASON = "failure_reason"  # why a FAILED run failed: "<Error>: <message>"
TAG_CHALLENGER_SCORE = "retrain.challenger_score"
TAG_CHAMPION_SCORE = "retrain.champion_score"
TAG_SCORE_METRIC = "retrain.score_metric"
UI_URL = "http://127.0.0.1:5000"  # where `make ui` serves the local store


def local_store_dir() -> Path:
    """The embedded store's folder: ``$VAE_MLRUNS_DIR`` or ``./mlruns``."""
    return settings.current().mlruns_dir


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the SQLite store in :func:`local_store_dir`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def is_local_store(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith("sqlite:///")


class TrackingUnavailableError(ConnectionError):
    """The configured MLflow tracking server does not answer (raised at once, not after minutes)."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server is down: MLflow's own retries take minutes.

    Raises:
        TrackingUnavailableError: naming the server and what to do.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({e.strerror or e}); start it, or unset "
            f"MLFLOW_TRACKING_URI to use the local store") from None


def get_client() -> MlflowClient:
    """A client on :func:`tracking_uri` (the registry lives in the same store).

    Raises:
        TrackingUnavailableError: ``MLFLOW_TRACKING_URI`` names a server that does not answer.
    """
    uri = tracking_uri()
    if is_local_store(uri):
        local_store_dir().mkdir(parents=True, exist_ok=True)
    else:
        check_reachable(uri)
    if is_local_store(uri) and uri not in _READY_STORES:
        client = _open_local_store_once(uri)
        _READY_STORES.add(uri)
        return client
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_READY_STORES: set[str] = set()  # local store URIs whose schema this process has seen ready


@contextlib.contextmanager
def exclusive_file_lock(path: str | Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block: the one
    way processes started at once on a new SQLite database take turns creating its schema."""
    import fcntl

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _open_local_store_once(uri: str) -> MlflowClient:
    """Open a local store under an exclusive file lock: processes that start at once on a new
    SQLite store would otherwise race on creating its schema (one of them crashes)."""
    with exclusive_file_lock(local_store_dir() / ".schema.lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates or migrates the tables
        client.search_registered_models(max_results=1)  # and the registry's
    return client


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (artifacts under ``mlruns/artifacts``) if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if is_local_store(client.tracking_uri):
        location = (local_store_dir() / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log a dict of metrics in one request (MLflow metric names keep the library's slashes)."""
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 900):  # MLflow's per-request limit is 1000 metrics
        client.log_batch(run_id, metrics=batch[i:i + 900], synchronous=True)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 90):  # per-request limit is 100 params
        client.log_batch(run_id, params=items[i:i + 90], synchronous=True)


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when it has local changes), or ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: str, dataset_digest: str, run_kind: str, flow_run_id: str | None = None) -> dict[str, str]:
    """The tags every pipeline run carries, named the same across runs."""
    import torch

    return {TAG_GIT_COMMIT: git_commit(), TAG_DATASET_DIGEST: dataset_digest, TAG_DEVICE: device,
            TAG_TORCH_VERSION: torch.__version__, TAG_FLOW_RUN_ID: flow_run_id or "", TAG_RUN_KIND: run_kind}


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source: str,
                profile: Mapping[str, Any], context: str = "training") -> None:
    """Record a dataset as the run's input (MLflow's Datasets panel): name, digest, source, sizes."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                      schema=json.dumps({"images": "uint8 (N, 28, 28)", "labels": "int64 (N,)"}),
                      profile=json.dumps(dict(profile)))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def run_link(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or the local UI that ``make ui`` starts."""
    uri = client.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class MLflowCallback(Callback):
    """Sends the trainer's per-epoch metrics to one MLflow run (by id, from any thread).

    Args:
        log_checkpoints: at the end of training, also log ``best_model.pth``, ``config.json`` and
            ``metrics.jsonl`` under ``checkpoints/`` (off for sweep trials, which keep them on disk).
    """

    def __init__(self, client: MlflowClient, run_id: str, log_checkpoints: bool = False):
        self.client, self.run_id, self.log_checkpoints = client, run_id, log_checkpoints

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, metrics, step=epoch)

    def on_train_end(self, trainer, result: dict[str, Any]) -> None:
        if not self.log_checkpoints:
            return
        run_dir = Path(result["run_dir"])
        for name in ("best_model.pth", "config.json", "metrics.jsonl"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name), "checkpoints")
