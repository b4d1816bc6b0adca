"""The ``vae-score`` flow: batch anomaly scores for a file of images from a registered model.

read the images (IDX, ``.npy`` or a folder of PNGs: :func:`vae.images.read_images`) -> load the
model (``models:/vae-mnist@champion`` unless told) -> score each image
(:func:`vae.ood.anomaly_scores`: negative ELBO, with ``k`` the IW bound, and the
complexity-corrected score, in nats under the model's protocol) -> write ``scores.csv`` and a
histogram into ``<output_dir>/<run id>/`` and log both to an MLflow run of ``vae-scoring``
(model version, data digest, score summary) -> print where they are.

Command line: ``python -m pipelines.scoring INPUT [--model URI] [--k 100]``; a bad file is one
``error:`` line naming it, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import tracking
from pipelines import console, registry
from vae.cli import run_cli
from vae.figures import plot_score_histograms
from vae.files import write_atomic
from vae.images import read_images
from vae.likelihood import likelihood_unit
from vae.ood import anomaly_scores

DEFAULT_MODEL = f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION}"
EXPERIMENT = "vae-scoring"
SCORES_FILE, HISTOGRAM_FILE = "scores.csv", "score_histogram.png"


@task(name="read-images", cache_policy=NO_CACHE)
def read(input_path: str) -> tuple[torch.Tensor, str]:
    return read_images(input_path)


@task(name="score", cache_policy=NO_CACHE)
def score(model_uri: str, images: torch.Tensor, k: int) -> dict[str, Any]:
    """The model's per-image scores, and which version gave them under which protocol."""
    client = tracking.get_client()
    version = registry.version_from_uri(client, model_uri)
    config = registry.version_config(client, version)
    model = registry.load_vae(registry.model_uri(version), client)
    loss, binarize = config.get("reconstruction_loss_type", "bce"), config.get("binarize", "none")
    scores = anomaly_scores(model, images, loss, binarize, k=k)
    return {"version": str(version.version), "scores": scores, "unit": likelihood_unit(loss, binarize)}


def scores_csv(scores: dict[str, torch.Tensor]) -> str:
    """One row per image: its index in the input, then every score (nats)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", *scores])
    for i, row in enumerate(zip(*(s.tolist() for s in scores.values()))):
        writer.writerow([i, *(f"{v:.4f}" for v in row)])
    return out.getvalue()


@task(name="log-scores", cache_policy=NO_CACHE)
def log_scores(result: dict[str, Any], model_uri: str, input_path: str, digest: str, k: int,
               output_dir: str, experiment_name: str) -> dict[str, str]:
    """Write the CSV and the histogram, and log them with the run's params, tags and summary."""
    client = tracking.get_client()
    run = client.create_run(tracking.ensure_experiment(client, experiment_name),
                            tags={tracking.TAG_RUN_KIND: "scoring", tracking.TAG_DATASET_DIGEST: digest})
    run_id, scores = run.info.run_id, result["scores"]
    folder = Path(output_dir) / run_id
    write_atomic(folder / SCORES_FILE, scores_csv(scores))
    main = scores.get("iw_bound", scores["nelbo"])
    plot_score_histograms({Path(input_path).name: main}, folder / HISTOGRAM_FILE,
                          f"{'IW bound' if 'iw_bound' in scores else 'negative ELBO'} per image, "
                          f"model version {result['version']}")
    tracking.log_params(client, run_id, {"model_uri": model_uri, "model_version": result["version"],
                                         "input": str(Path(input_path).resolve()), "k": k, "num_images": len(main)})
    summary = {f"score/{q}": float(main.quantile(v)) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
    tracking.log_metrics(client, run_id, {**summary, "score/mean": float(main.mean())})
    for name in (SCORES_FILE, HISTOGRAM_FILE):
        client.log_artifact(run_id, str(folder / name))
    client.set_terminated(run_id)
    return {"run_id": run_id, "model_version": result["version"], "scores": str(folder / SCORES_FILE),
            "histogram": str(folder / HISTOGRAM_FILE), "run": tracking.run_link(client, run.info.experiment_id, run_id),
            "mlflow_scores": tracking.artifact_link(client, run_id, SCORES_FILE), "unit": result["unit"]}


@flow(name="vae-scoring", log_prints=True)
def vae_score(input_path: str, model_uri: str = DEFAULT_MODEL, k: int = 0, output_dir: str = "outputs/scores",
              experiment_name: str = EXPERIMENT) -> dict[str, str]:
    """Score every image of ``input_path`` with a registered model.

    Args:
        input_path: an IDX image file (``.gz`` or not), a ``.npy`` array (N, 28, 28) or a folder of
            28x28 PNGs.
        model_uri: ``models:/vae-mnist@<alias>`` or ``models:/vae-mnist/<version>``.
        k: importance samples of the IW bound per image (0: the negative ELBO only).
        output_dir, experiment_name: where the CSV and histogram go; the MLflow experiment.
    Returns:
        run id, model version, the files' paths, the run's link.
    """
    images, digest = read(input_path)
    out = log_scores(score(model_uri, images, k), model_uri, input_path, digest, k, output_dir, experiment_name)
    print(f"scored {len(images):,} images with {tracking.MODEL_NAME} version {out['model_version']} "
          f"({out['unit']})")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-score", description="Anomaly scores for a file of images (vae-score flow).")
    p.add_argument("input", help="an IDX image file, a .npy array (N, 28, 28) or a folder of 28x28 PNGs")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model URI (default: {DEFAULT_MODEL})")
    p.add_argument("--k", type=int, default=0, help="importance samples of the IW bound (default 0: negative ELBO)")
    p.add_argument("--output_dir", default="outputs/scores", help="folder for <run id>/scores.csv and the histogram")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default: {EXPERIMENT})")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 0:
        print(f"error: --k: must be >= 0, got {args.k}", file=sys.stderr)
        return 2
    read_images(args.input)  # a bad file: one line before any flow run starts
    client = tracking.get_client()
    try:
        registry.version_from_uri(client, args.model)
    except (ValueError, MlflowException) as e:
        print(f"error: {args.model}: no such registered model version ({str(e).splitlines()[0]}); "
              f"run make demo, or pass --model models:/{tracking.MODEL_NAME}/<version>", file=sys.stderr)
        return 2
    console.hide_user_error_tracebacks()
    out = vae_score(args.input, args.model, args.k, args.output_dir, args.experiment)
    print(console.dumps(out))
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
