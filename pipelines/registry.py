"""The model registry: log a trained VAE as an MLflow model, register it, move aliases, load it back.

Format: a pyfunc "model from code" (:mod:`pipelines.vae_pyfunc`) with the trainer's checkpoint
as its artifact and the flat config (plus the registered name and version) as its
``model_config``, not ``mlflow.pytorch``. That
flavour's default ``pt2`` format fails on the VAE's tuple-returning forward and loads back as a
``GraphModule`` without ``encode``/``decode``; its ``pickle`` format loads the class, but
unpickling runs code. The checkpoint is a plain dict of tensors that
:func:`vae.checkpoint.load_model` reads with ``weights_only=True``, and :func:`load_vae` gives
back a real :class:`vae.model.VAE`.

Every call goes through the given ``MlflowClient`` and its store: the model is saved into a
temporary folder and uploaded as a logged model of the run, then registered; loading downloads
a version's files and loads them from disk. Nothing touches MLflow's process-wide tracking or
registry URI (or ``MLFLOW_TRACKING_URI``), which the fluent ``log_model``/``load_model``
(``models:/`` URIs) read, so Prefect tasks in worker threads can log and load at once. A user
whose ``MLFLOW_TRACKING_URI`` points at the store can still
``mlflow.pyfunc.load_model("models:/vae-mnist@champion")``.

Versions are never deleted; the aliases ``champion`` and ``challenger`` point at them.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

import tracking
from pipelines import vae_pyfunc
from vae.checkpoint import load_model

PYFUNC_CODE = Path(__file__).with_name("vae_pyfunc.py")
MODEL_ARTIFACT = "model"


def _pip_requirements() -> list[str]:
    return [f"mlflow=={mlflow.__version__}", f"torch=={version('torch').split('+')[0]}",
            f"torchvision=={version('torchvision').split('+')[0]}", "numpy"]


def _signature_and_example(checkpoint: str | Path) -> tuple[Any, np.ndarray]:
    """Two blank images in; the inference parameters (``output``, ``k``, ``n``, ``seed``) with
    their defaults, so ``/invocations`` and the MLflow UI show what a request may ask for. No
    output schema: the output is a dict whose keys depend on ``output`` (:mod:`pipelines.vae_pyfunc`)."""
    model, _ = load_model(checkpoint, "cpu")
    example = np.zeros((2, model.in_channels, model.image_size, model.image_size), dtype=np.float32)
    return infer_signature(example, params=dict(vae_pyfunc.PARAMS)), example


def _save_and_upload(client: MlflowClient, logged: Any, run_id: str, checkpoint: str | Path,
                     model_config: Mapping[str, Any]) -> None:
    """Save the pyfunc model into a temporary folder and upload it as the logged model's files."""
    signature, example = _signature_and_example(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                     model_id=logged.model_id)
        mlflow.pyfunc.save_model(
            Path(tmp) / MODEL_ARTIFACT, python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(checkpoint)},
            model_config=dict(model_config), signature=signature, input_example=example,
            pip_requirements=_pip_requirements(), mlflow_model=meta)
        client.log_model_artifacts(logged.model_id, str(Path(tmp) / MODEL_ARTIFACT))


def _new_version(client: MlflowClient, run_id: str, logged: Any, tags: Mapping[str, str] | None) -> ModelVersion:
    try:
        client.create_registered_model(tracking.MODEL_NAME)
    except MlflowException as e:  # registered by an earlier run (or another process just now)
        if e.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    # The source is the files' location: a models:/<id> source is resolved through the global URI.
    return client.create_model_version(tracking.MODEL_NAME, source=logged.artifact_location, run_id=run_id,
                                       tags=dict(tags or {}), model_id=logged.model_id)


def log_and_register(client: MlflowClient, run_id: str, checkpoint: str | Path, config: Mapping[str, Any],
                     tags: Mapping[str, str] | None = None, alias: str | None = tracking.CHALLENGER) -> ModelVersion:
    """Log ``checkpoint`` as the run's model (named ``model``, its output), register it as
    ``vae-mnist``, point ``alias`` at it.

    The version is created first and its number written into the model's ``model_config``
    (:data:`pipelines.vae_pyfunc.VERSION_KEY`), so a served model says which version answered.
    The files are uploaded next; if that fails the version is deleted and the logged model
    marked FAILED, so no version points at missing files for longer than the upload.
    Returns:
        The new model version (the registry's, with ``tags`` set on it).
    """
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id,
                                        params=dict(run.data.params))
    version = None
    try:
        version = _new_version(client, run_id, logged, tags)
        serving = {vae_pyfunc.NAME_KEY: tracking.MODEL_NAME, vae_pyfunc.VERSION_KEY: str(version.version)}
        _save_and_upload(client, logged, run_id, checkpoint, {**config, **serving})
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        if version is not None:
            client.delete_model_version(tracking.MODEL_NAME, version.version)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    if alias:
        client.set_registered_model_alias(tracking.MODEL_NAME, alias, version.version)
    return client.get_model_version(tracking.MODEL_NAME, version.version)


def version_by_alias(client: MlflowClient, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None (no such model or alias yet)."""
    try:
        return client.get_model_version_by_alias(tracking.MODEL_NAME, alias)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, alias: str, version: str | int) -> None:
    client.set_registered_model_alias(tracking.MODEL_NAME, alias, str(version))


def model_uri(version: ModelVersion | str | int) -> str:
    """``models:/vae-mnist/<version>``."""
    number = version.version if isinstance(version, ModelVersion) else version
    return f"models:/{tracking.MODEL_NAME}/{number}"


def version_from_uri(client: MlflowClient, uri: str) -> ModelVersion:
    """The version a ``models:/vae-mnist/<version>`` or ``models:/vae-mnist@<alias>`` URI names,
    looked up in ``client``'s registry."""
    name_and_rest = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, at, alias = name_and_rest.partition("@")
    if at:
        return client.get_model_version_by_alias(name, alias)
    name, slash, number = name_and_rest.partition("/")
    if not (slash and number.isdigit()):
        raise ValueError(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return client.get_model_version(name, number)


def _download(client: MlflowClient, version: ModelVersion, dst: str, path: str = "") -> str:
    """Download a version's model files (or one of them) from ``client``'s store into ``dst``."""
    root = client.get_model_version_download_uri(version.name, version.version)
    return mlflow.artifacts.download_artifacts(artifact_uri=f"{root.rstrip('/')}/{path}" if path else root,
                                               dst_path=dst, tracking_uri=client.tracking_uri)


def load_pyfunc(uri: str, client: MlflowClient | None = None):
    """The registered model as a pyfunc (``predict`` on images), from the pipeline's store."""
    client = client or tracking.get_client()
    with tempfile.TemporaryDirectory() as tmp:  # the checkpoint is read into memory while loading
        return mlflow.pyfunc.load_model(_download(client, version_from_uri(client, uri), tmp))


def load_vae(uri: str, client: MlflowClient | None = None):
    """The registered model as a :class:`vae.model.VAE` in eval mode (weights read weights_only)."""
    return load_pyfunc(uri, client).unwrap_python_model().vae


def version_config(client: MlflowClient, version: ModelVersion) -> dict[str, Any]:
    """The flat training config a version was logged with (its ``model_config``)."""
    with tempfile.TemporaryDirectory() as tmp:
        meta = Model.load(_download(client, version, tmp, "MLmodel"))
    config = meta.flavors.get("python_function", {}).get("config") or getattr(meta, "model_config", None)
    if not config:
        raise ValueError(f"{model_uri(version)} carries no training config")
    return {key: value for key, value in config.items() if key not in (vae_pyfunc.NAME_KEY, vae_pyfunc.VERSION_KEY)}
