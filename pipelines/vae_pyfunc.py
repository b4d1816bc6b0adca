"""The registered model's code: an MLflow pyfunc "model from code" around a VAE checkpoint.

MLflow stores this file with the model and runs it when the model is loaded (``mlflow models
serve``, ``mlflow.pyfunc.load_model``); the weights travel as the trainer's checkpoint (a plain
dict of tensors) and are read with ``weights_only=True`` (:func:`vae.checkpoint.load_model`), so
loading a registered model never unpickles code. Needs the ``vae`` package importable where the
model is loaded (``pip install -e .``).

``predict`` takes images as a float32 array (N, 1, 28, 28) in [0, 1] and returns a dict that names
the registered version that answered (``model_version``, from the ``model_config`` the registry
wrote; ``model_id`` too) and, per ``params={"output": ...}``:

- ``reconstruction`` (default): ``reconstruction`` (N, 1, 28, 28), decoded from the posterior
  means (the autoregressive decoder: each pixel's mean given the true pixels before it);
- ``latent_mean``: ``latent_mean`` (N, D), the posterior means;
- ``anomaly_score``: per image, in nats under the model's protocol (:func:`vae.ood.anomaly_scores`,
  equal to :func:`vae.evaluate.evaluate`'s figures on the same images and ``seed``): ``nelbo``,
  ``recon``, ``kl``, with ``k`` > 0 ``iw_bound``, and ``complexity_corrected`` (the bound or the
  negative ELBO minus the zlib length: :func:`vae.ood.complexity_corrected`). Higher = more unusual;
- ``samples``: ``samples`` (n, 1, 28, 28) drawn from the prior with ``seed`` (the input is ignored).

The fast form (``encoding="uint8_b64"``): images as base64 of raw uint8 bytes (N x 784, 0-255) in
``params["images_b64"]`` (``inputs`` is then ignored: send one blank image, as MLflow's JSON
requires an input of the signature's shape), and image outputs returned the same way with their
``shape``. MLflow's protocol takes tensors as nested JSON lists, whose parsing and writing cost
more than the model at batch 256 (BENCHMARKS.md, "Serving").

A bad request (NaN or pixels outside [0, 1], too many images, a bad parameter) raises an
``MlflowException`` (INVALID_PARAMETER_VALUE): the scoring server answers 400 with the message.
``unwrap_python_model().vae`` is the :class:`vae.model.VAE` itself (EMA weights, eval mode).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from vae.checkpoint import load_model
from vae.ood import anomaly_scores

OUTPUTS = ("reconstruction", "latent_mean", "anomaly_score", "samples")
# Defaults of the inference parameters (the signature's ParamSchema says the same).
PARAMS = {"output": "reconstruction", "k": 0, "n": 16, "seed": 0, "images_b64": "", "encoding": "float"}
# "uint8_b64": images (in ``images_b64``, and image outputs) as base64 of raw uint8 bytes, row-major
# (N, 1, 28, 28), 0-255: JSON's nested float lists cost more than the model itself at batch 256.
ENCODINGS = ("float", "uint8_b64")
PIXELS = 28 * 28
MAX_IMAGES = 10_000  # per request: bounds a request's memory and time (a bigger one gets a 400)
MAX_IW_WORK = 1_000_000  # images x k per request, for the IW bound
VERSION_KEY = "registered_model_version"  # model_config keys the registry adds to the flat config
NAME_KEY = "registered_model_name"


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The inference parameters with defaults filled in; raises a 400-type error naming a bad one."""
    out = {**PARAMS, **{key: value for key, value in (params or {}).items() if value is not None}}
    for key, choices in (("output", OUTPUTS), ("encoding", ENCODINGS)):
        if out[key] not in choices:
            raise _bad(f"params['{key}'] must be one of {', '.join(choices)}, got {out[key]!r}")
    for key, low, high in (("k", 0, MAX_IW_WORK), ("n", 1, MAX_IMAGES), ("seed", 0, 2**63 - 1)):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise _bad(f"params['{key}'] must be an integer in [{low}, {high}], got {value!r}")
    return out


def decode_b64(text: str) -> np.ndarray:
    """``params['images_b64']`` -> float32 (N, 1, 28, 28) in [0, 1]."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"params['images_b64'] is not base64: {e}") from None
    if not raw or len(raw) % PIXELS:
        raise _bad(f"params['images_b64'] holds {len(raw):,} bytes: expected N x 784 (uint8, 28x28 per image)")
    if len(raw) // PIXELS > MAX_IMAGES:
        raise _bad(f"{len(raw) // PIXELS:,} images in one request; at most {MAX_IMAGES:,}: split the batch")
    return (np.frombuffer(raw, dtype=np.uint8).reshape(-1, 1, 28, 28) / np.float32(255)).astype(np.float32)


def encode_b64(images: np.ndarray) -> str:
    """Images in [0, 1] as base64 of their uint8 grey levels (row-major)."""
    return base64.b64encode(np.rint(images * 255).astype(np.uint8).tobytes()).decode("ascii")


def check_images(model_input: Any) -> np.ndarray:
    """Float32 images (N, 1, 28, 28) in [0, 1]; raises a 400-type error saying what is wrong."""
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise _bad(f"images must be numbers in [0, 1], shape (N, 1, 28, 28): {e}") from None
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28) or len(x) == 0:
        raise _bad(f"images must have shape (N, 1, 28, 28) with N >= 1, got {x.shape}")
    if len(x) > MAX_IMAGES:
        raise _bad(f"{len(x):,} images in one request; at most {MAX_IMAGES:,}: split the batch")
    if not np.isfinite(x).all():
        raise _bad("images contain NaN or infinite pixels: pixels must be numbers in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise _bad(f"pixels must be in [0, 1], got min {x.min():.3g}, max {x.max():.3g}")
    return x


class VAEPyfunc(PythonModel):
    """Loads ``artifacts['checkpoint']`` into a VAE on the CPU; knows its version from ``model_config``."""

    def load_context(self, context) -> None:
        self.vae, _ = load_model(context.artifacts["checkpoint"], "cpu")
        config = dict(context.model_config or {})
        self.loss_type = config.get("reconstruction_loss_type", "bce")
        self.binarize = config.get("binarize", "none")
        self.version = str(config.get(VERSION_KEY, "unregistered"))

    # Typed (an array in, a dict out) so MLflow 3 does not warn "Add type hints to the predict
    # method"; np.ndarray is a hint MLflow takes without inferring a schema from it, so the
    # explicit signature logged with the model (images, params) still rules.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, Any]:
        p = check_params(params)
        out: dict[str, Any] = {"model_version": self.version, "output": p["output"]}
        if p["output"] == "samples":
            gen = torch.Generator().manual_seed(p["seed"])
            return self._images(out, "samples", self.vae.sample(p["n"], generator=gen).numpy(), p["encoding"])
        x = torch.from_numpy(decode_b64(p["images_b64"]) if p["images_b64"] else check_images(model_input))
        if p["output"] == "anomaly_score":
            if p["k"] * len(x) > MAX_IW_WORK:
                raise _bad(f"k x images = {p['k']} x {len(x)} is over {MAX_IW_WORK:,} per request: "
                           f"send fewer images or a smaller k")
            scores = anomaly_scores(self.vae, x, self.loss_type, self.binarize, k=p["k"], seed=p["seed"])
            return {**out, **{key: value.numpy() for key, value in scores.items()}}
        with torch.no_grad():
            mu, _ = self.vae.encode(x)
            if p["output"] == "latent_mean":
                return {**out, "latent_mean": mu.numpy()}
            return self._images(out, "reconstruction", self.vae.decode(mu, x).numpy(), p["encoding"])

    @staticmethod
    def _images(out: dict[str, Any], name: str, images: np.ndarray, encoding: str) -> dict[str, Any]:
        if encoding == "uint8_b64":
            return {**out, name: encode_b64(images), "shape": list(images.shape), "encoding": encoding}
        return {**out, name: images}


mlflow.models.set_model(VAEPyfunc())
