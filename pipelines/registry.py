"""The model registry: log a trained VAE as an MLflow model, register it, move aliases, load it back.

Format: a pyfunc "model from code" (:mod:`pipelines.vae_pyfunc`) with the trainer's checkpoint
as its artifact and the flat config as its ``model_config``, not ``mlflow.pytorch``. That
flavour's default ``pt2`` format fails on the VAE's tuple-returning forward and loads back as a
``GraphModule`` without ``encode``/``decode``; its ``pickle`` format loads the class, but
unpickling runs code. The checkpoint is a plain dict of tensors that :func:`vae.utils.load_model`
reads with ``weights_only=True``, and :func:`load_vae` gives back a real :class:`vae.model.VAE`.

Versions are never deleted; the aliases ``champion`` and ``challenger`` point at them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import tracking

PYFUNC_CODE = Path(__file__).with_name("vae_pyfunc.py")
MODEL_ARTIFACT = "model"


@contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model`` has no client form) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``; the variable is put back.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _pip_requirements() -> list[str]:
    import torch
    import torchvision

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}", "numpy"]


def _signature_and_example(checkpoint: str | Path) -> tuple[Any, np.ndarray]:
    """Two blank images in, their reconstructions out; ``output`` as an inference parameter."""
    import torch

    from vae.utils import load_model

    model, _ = load_model(checkpoint, "cpu")
    example = np.zeros((2, model.in_channels, model.image_size, model.image_size), dtype=np.float32)
    with torch.no_grad():
        output = model.decode(model.encode(torch.from_numpy(example))[0]).numpy()
    return infer_signature(example, output, params={"output": "reconstruction"}), example


def log_and_register(client: MlflowClient, run_id: str, checkpoint: str | Path, config: Mapping[str, Any],
                     tags: Mapping[str, str] | None = None, alias: str | None = tracking.CHALLENGER) -> ModelVersion:
    """Log ``checkpoint`` as the run's model, register it as ``vae-mnist``, point ``alias`` at it.

    The logged model has a signature, an input example and the flat config (``model_config``).
    Returns:
        The new model version (the registry's, with ``tags`` set on it).
    """
    signature, example = _signature_and_example(checkpoint)
    with _fluent_store(client.tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(checkpoint)},
            model_config=dict(config), signature=signature, input_example=example,
            pip_requirements=_pip_requirements())
        version = mlflow.register_model(info.model_uri, tracking.MODEL_NAME, tags=dict(tags or {}))
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


def load_pyfunc(uri: str, client: MlflowClient | None = None):
    """The registered model as a pyfunc (``predict`` on images), from the pipeline's store."""
    client = client or tracking.get_client()
    with _fluent_store(client.tracking_uri):
        return mlflow.pyfunc.load_model(uri)


def load_vae(uri: str, client: MlflowClient | None = None):
    """The registered model as a :class:`vae.model.VAE` in eval mode (weights read weights_only)."""
    return load_pyfunc(uri, client).unwrap_python_model().vae


def version_config(client: MlflowClient, version: ModelVersion) -> dict[str, Any]:
    """The flat training config a version was logged with (its ``model_config``)."""
    from mlflow.models import Model

    with _fluent_store(client.tracking_uri):
        meta = Model.load(model_uri(version))
    config = meta.flavors.get("python_function", {}).get("config") or getattr(meta, "model_config", None)
    if not config:
        raise ValueError(f"{model_uri(version)} carries no training config")
    return dict(config)
