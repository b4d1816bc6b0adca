"""The registered model's code: an MLflow pyfunc "model from code" around a VAE checkpoint.

MLflow stores this file with the model and runs it when the model is loaded; the weights travel
as the trainer's checkpoint (a plain dict of tensors) and are read with ``weights_only=True``
(:func:`vae.checkpoint.load_model`), so loading a registered model never unpickles code. Needs the
``vae`` package importable where the model is loaded (``pip install -e .``).

``predict`` takes images as a float32 array (N, 1, 28, 28) in [0, 1] and returns, per
``params={"output": ...}``, the reconstructions from the posterior means (default,
"reconstruction", (N, 1, 28, 28)) or the posterior means themselves ("latent_mean", (N, D)).
``unwrap_python_model().vae`` is the :class:`vae.model.VAE` itself (EMA weights, eval mode).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

OUTPUTS = ("reconstruction", "latent_mean")


class VAEPyfunc(PythonModel):
    """Loads ``artifacts['checkpoint']`` into a VAE on the CPU."""

    def load_context(self, context) -> None:
        from vae.checkpoint import load_model

        self.vae, _ = load_model(context.artifacts["checkpoint"], "cpu")

    # Typed (an array in, an array out) so MLflow 3 does not warn "Add type hints to the predict
    # method"; np.ndarray is a hint MLflow takes without inferring a schema from it, so the
    # explicit signature logged with the model (images, params={"output": ...}) still rules.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        output = (params or {}).get("output", "reconstruction")
        if output not in OUTPUTS:
            raise ValueError(f"params['output'] must be one of {', '.join(OUTPUTS)}, got {output!r}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        x = x.reshape(-1, self.vae.in_channels, self.vae.image_size, self.vae.image_size)
        with torch.no_grad():
            mu, _ = self.vae.encode(x)
            return (mu if output == "latent_mean" else self.vae.decode(mu)).numpy()


mlflow.models.set_model(VAEPyfunc())
