"""What a run records: metrics and params in batches, the standard tags, the dataset, and the
trainer callback that sends each epoch's metrics (by run id, from any thread); and where a user
opens a run (:func:`run_link`) or one of its artifacts (:func:`artifact_link`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from tracking.names import (TAG_DATASET_DIGEST, TAG_DEVICE, TAG_FLOW_RUN_ID, TAG_GIT_COMMIT, TAG_PROCESS_HOST,
                            TAG_PROCESS_PID, TAG_RUN_KIND, TAG_TORCH_VERSION, UI_URL, UI_WORKFLOW_QUERY)
from vae.callbacks import Callback

def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log a dict of metrics in one request (MLflow metric names keep the library's slashes)."""
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 900):  # MLflow's per-request limit is 1000 metrics
        client.log_batch(run_id, metrics=batch[i:i + 900], synchronous=True)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
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
    import torch  # here, not at the top: `import tracking` stays light for the commands that train nothing

    return {TAG_GIT_COMMIT: git_commit(), TAG_DATASET_DIGEST: dataset_digest, TAG_DEVICE: device,
            TAG_TORCH_VERSION: torch.__version__, TAG_FLOW_RUN_ID: flow_run_id or "", TAG_RUN_KIND: run_kind}


def process_tags() -> dict[str, str]:
    """The tags naming this process (host, pid), by which a later start tells a run whose process died."""
    return {TAG_PROCESS_HOST: socket.gethostname(), TAG_PROCESS_PID: str(os.getpid())}


def process_died(tags: Mapping[str, str]) -> bool:
    """Whether the process that ``tags`` (:func:`process_tags`) name is gone. Only a process of this
    host can be judged: a run of another machine, or of this very process, counts as alive."""
    pid = tags.get(TAG_PROCESS_PID, "")
    if tags.get(TAG_PROCESS_HOST) != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    return False


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source: str,
                profile: Mapping[str, Any], context: str = "training") -> None:
    """Record a dataset as the run's input (MLflow's Datasets panel): name, digest, source, sizes."""
    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                      schema=json.dumps({"images": "uint8 (N, 28, 28)", "labels": "int64 (N,)"}),
                      profile=json.dumps(dict(profile)))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def run_link(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or the local UI that ``make ui`` starts.

    The link asks for MLflow 3's model-training view (``?workflowType=machine_learning``): without
    it the UI shows GenAI panels (traces, "No data available") around the run."""
    return f"{_ui_base(client)}/#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW_QUERY}"


def experiment_link(client: MlflowClient, experiment_id: str) -> str:
    """The experiment's page, opened on its table of training runs (not the GenAI overview)."""
    return f"{_ui_base(client)}/#/experiments/{experiment_id}?{UI_WORKFLOW_QUERY}"


def _ui_base(client: MlflowClient) -> str:
    uri = client.tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL


def artifact_link(client: MlflowClient, run_id: str, path: str) -> str:
    """Where a user opens the artifact ``path`` (``figures/reconstructions.png``) of a run:
    :func:`artifact_location` of the run's artifact root."""
    return artifact_location(client.tracking_uri, client.get_run(run_id).info.artifact_uri, run_id, path)


def artifact_location(tracking_uri: str, artifact_root: str, run_id: str, path: str) -> str:
    """A local store keeps artifacts in a folder (``mlruns/artifacts/<run>/artifacts``): the file's
    absolute path, which any viewer opens. A tracking server serves them at ``/get-artifact``: that
    URL (a browser shows the PNG). Any other store (say ``s3://``): the artifact's URI.
    """
    if urllib.parse.urlparse(artifact_root).scheme in ("", "file"):
        return str(Path(local_file_uri_to_path(artifact_root)).resolve() / path)
    if tracking_uri.startswith(("http://", "https://")):
        query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        return f"{tracking_uri.rstrip('/')}/get-artifact?{query}"
    return f"{artifact_root.rstrip('/')}/{path}"


class MLflowCallback(Callback):
    """Sends the trainer's per-epoch metrics to one MLflow run (by id, from any thread).

    Args:
        client: an ``MlflowClient``, or a run's :class:`tracking.outbox.Outbox` (the pipelines':
            training then never waits on the server).
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
