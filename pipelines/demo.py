"""``make demo``: the ``vae-training`` flow once, on embedded defaults, then where to look.

Defaults: the ``small`` preset (hidden 16-32-64, latent 16, a Bernoulli decoder on dynamically
binarised images, 3 epochs on a 10,000-image subset of
MNIST's training set, 1,000 of them for validation); evaluation on the first 500 test images
with a k = 1,000 IW bound (the vae-train deployment uses the same images, so scores compare), the
linear probe and the classifier FID (its classifier is trained once and cached); every figure; the model
registered as a ``vae-mnist`` version aliased ``challenger``. Data from ``$VAE_DATA_DIR``
(``./data`` otherwise), runs in ``./mlruns`` unless ``MLFLOW_TRACKING_URI`` says otherwise; Prefect
runs on its local ephemeral API unless ``PREFECT_API_URL`` names a server.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import tracking
from pipelines.training import build_config, check_inputs, vae_training
from vae.cli import run_cli
from vae.likelihood import likelihood_protocol, likelihood_reference, likelihood_unit

DEMO = {"preset": "small", "iw_k": 1000, "eval_max_images": 500}
DEMO_NATS = 104  # what the small preset's 3 epochs scored on the real MNIST (BENCHMARKS.md, `make demo`)
PYTHON = ".venv/bin/python"  # commands a user pastes from the checkout (README: never a bare `python`)


def summary(out: dict[str, Any], client, minutes: float) -> str:
    """What the demo prints: the score in words, and paths, links and commands that open as printed."""
    cfg, key, version = out["config"], out["score_key"], out["model_version"]
    loss, binarize = cfg["reconstruction_loss_type"], cfg["binarize"]
    protocol = likelihood_protocol(loss, binarize, DEMO["iw_k"], DEMO["eval_max_images"])
    reference = likelihood_reference(loss, binarize)
    if loss == "bce" and binarize != "none":
        reference = reference.replace("; ", f"; ≈ {DEMO_NATS} after this 3-epoch demo; ", 1)
    figures = "\n".join(f"    {tracking.artifact_link(client, out['run_id'], p)}" for p in out["figures"].values())
    experiment = cfg["experiment_name"]
    val = out["final_metrics"].get("val/nelbo", float("nan"))
    return f"""
vae-training finished in {minutes:.1f} min (MLflow experiment {experiment!r}, run {out['run_id']})
  score:      {key} = {out['metrics'][key]:.2f} nats per image
              ({protocol})
              {reference}
  val/nelbo:  {val:.2f} (negative ELBO on the held-out training images; {likelihood_unit(loss, binarize, trainer=True)})
  checkpoint: {out['best_model_path']}
  figures:
{figures}
  model:      {version['uri']} (alias {tracking.CHALLENGER}); load it with pipelines.registry.load_vae("{version['uri']}")
  tracking:   {client.tracking_uri}
  run page:   {tracking.run_link(client, out['experiment_id'], out['run_id'])}
Sample from it: {PYTHON} -m vae.sample --model_path {out['best_model_path']} --output_dir samples/demo
Browse it:      make ui   (MLflow UI on {tracking.UI_URL})
Compare runs:   {PYTHON} -m pipelines.compare --experiment {experiment} --metric {key}"""


def main() -> int:
    t0 = time.perf_counter()
    check_inputs(build_config(DEMO["preset"]))  # missing data: one line before any flow run starts
    tracking.get_client()  # an unreachable tracking server: one line before any flow run starts
    out = vae_training(**DEMO)
    print(summary(out, tracking.get_client(), (time.perf_counter() - t0) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(), None))
