"""``make demo``: the ``vae-training`` flow once, on embedded defaults, then where to look.

Defaults: the ``small`` preset (hidden 16-32-64, latent 16, 3 epochs on a 10,000-image subset of
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

import tracking
from pipelines.training import vae_training
from vae.cli import run_cli

DEMO = {"preset": "small", "iw_k": 1000, "eval_max_images": 500}


def main() -> int:
    t0 = time.perf_counter()
    tracking.get_client()  # an unreachable tracking server: one line before any flow run starts
    out = vae_training(**DEMO)
    minutes = (time.perf_counter() - t0) / 60
    client = tracking.get_client()
    score = out["score_key"]
    version = out["model_version"]
    print(f"""
vae-training finished in {minutes:.1f} min (MLflow experiment {out['config']['experiment_name']!r}, run {out['run_id']})
  val/nelbo {out['final_metrics'].get('val/nelbo', float('nan')):.2f}   {score} {out['metrics'][score]:.2f}  (nats per image, first {DEMO['eval_max_images']} test images)
  checkpoint: {out['best_model_path']}   (python -m vae.sample --model_path <it> --output_dir samples/demo)
  figures:   {', '.join(out['figures'].values())}
  model:     {version['uri']} (alias {tracking.CHALLENGER}); load it with pipelines.registry.load_vae("{version['uri']}")
  tracking:  {client.tracking_uri}
  run page:  {tracking.run_link(client, out['experiment_id'], out['run_id'])}
Browse it: make ui   (MLflow UI on {tracking.UI_URL})
Compare runs: python -m pipelines.compare --experiment {out['config']['experiment_name']} --metric {score} --param model.latent_dim""")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(), None))
