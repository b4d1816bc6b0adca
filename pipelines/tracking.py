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

import os
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from vae.train import Callback

MODEL_NAME = "vae-mnist"
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GIT_COMMIT = "git_commit"
TAG_DATASET_DIGEST = "dataset_digest"
TAG_DEVICE = "device"
TAG_TORCH_VERSION = "torch_version"
TAG_FLOW_RUN_ID = "prefect_flow_run_id"
TAG_RUN_KIND = "run_kind"  # training | retraining | sweep | trial


def local_store_dir() -> Path:
    """The embedded store's folder: ``$VAE_MLRUNS_DIR`` or ``./mlruns``."""
    return Path(os.environ.get("VAE_MLRUNS_DIR", "mlruns")).resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the SQLite store in :func:`local_store_dir`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def is_local_store(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith("sqlite:///")


def get_client() -> MlflowClient:
    """A client on :func:`tracking_uri` (the registry lives in the same store)."""
    uri = tracking_uri()
    if is_local_store(uri):
        local_store_dir().mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


class MLflowCallback(Callback):
    """Sends the trainer's per-epoch metrics to one MLflow run (by id, from any thread)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, metrics, step=epoch)
