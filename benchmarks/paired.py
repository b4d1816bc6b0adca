"""Two trained checkpoints on the same held-out images: each one's IW bound and their paired difference.

The screens in BENCHMARKS.md ("What each idea gave") train two configs side by side; this scores
both models on the validation images that neither trained on (the splits come from the models'
configs), binarised once with one seed, with the same seed for the importance samples, so the
per-image differences cancel most of the images' and the samples' luck (:mod:`vae.paired`).
Choosing between configs this way never looks at the test set; ``--split test`` scores the first
``--images`` test images instead, to report, not to choose.

    python -m benchmarks.paired A/best_model.pth B/best_model.pth            # validation, k = 100
    python -m benchmarks.paired A.pth B.pth --k 1000 --split test --images 2000
"""

from __future__ import annotations

import argparse
import json
import sys

from vae.checkpoint import load_model
from vae.cli import run_cli
from vae.config import validate_config
from vae.data import Split, load_dataset
from vae.errors import UserError
from vae.paired import COMPARABLE_KEYS, SPLIT_KEYS, held_out_images, paired_difference, per_image_scores
from vae import fast


def compare(path_a: str, path_b: str, data_dir=None, *, k: int = 100, split: str = "val", images: int = 0,
            seed: int | None = None) -> dict:
    """Both models' per-image bounds on the same images of their dataset (read from ``data_dir``,
    default ``$VAE_DATA_DIR``) and ``a - b``'s mean and standard error, nats."""
    (model_a, ckpt_a), (model_b, ckpt_b) = load_model(path_a), load_model(path_b)
    cfg_a, cfg_b = validate_config(ckpt_a["config"]).to_dict(), validate_config(ckpt_b["config"]).to_dict()
    for key in COMPARABLE_KEYS:
        if cfg_a[key] != cfg_b[key]:
            raise UserError(f"the two models' bounds are not comparable: {key} is {cfg_a[key]!r} in {path_a} and "
                            f"{cfg_b[key]!r} in {path_b}; compare models trained with the same {key}")
    data = load_dataset(data_dir, cfg_a["dataset"])
    if split == "val":
        shared = held_out_images(data.train_images, data.train_labels, {key: cfg_a[key] for key in SPLIT_KEYS},
                                 {key: cfg_b[key] for key in SPLIT_KEYS}, limit=images)
    else:
        n = images or len(data.test_images)
        shared = Split(data.test_images[:n], data.test_labels[:n])
    seed = cfg_a["seed"] if seed is None else seed
    scores = [per_image_scores(fast.accelerate(model, "cpu", enabled=cfg["fast"]), shared,
                               loss_type=cfg["reconstruction_loss_type"], binarize=cfg["binarize"], k=k, seed=seed)
              for model, cfg in ((model_a, cfg_a), (model_b, cfg_b))]
    return {"a": path_a, "b": path_b, "split": split, "k": k, "seed": seed, **paired_difference(*scores)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--k", type=int, default=100, help="importance samples per image (0 = one-sample NELBO)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="held-out validation images of both splits (default), or the first test images")
    p.add_argument("--images", type=int, default=0, help="the first N of those images (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="binarisation and sampling seed (default: model A's)")
    p.add_argument("--data_dir", default=None, help="MNIST folder (default: $VAE_DATA_DIR, else ./data)")
    args = p.parse_args(argv)
    if args.k < 0 or args.images < 0:
        p.error("--k and --images must be 0 or more")
    out = compare(args.model_a, args.model_b, args.data_dir, k=args.k, split=args.split,
                  images=args.images, seed=args.seed)
    what = f"IW bound k={args.k}" if args.k else "negative ELBO"
    print(f"{what} on {out['images']} {'held-out validation' if args.split == 'val' else 'test'} images "
          f"(nats per image): A {out['mean_a']:.3f}, B {out['mean_b']:.3f}, "
          f"A - B {out['difference']:+.3f} ± {out['se']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(run_cli(main))
