"""Likelihood benchmark: train ``get_benchmark_config()`` on the CPU, report the test IW bound.

Protocol of the published numbers: Bernoulli decoder (BCE), dynamically binarised MNIST for
training, one fixed binarisation of the test images, the importance-weighted bound with
k = 5,000 samples (Burda et al. 2015), nats per image. Anchors: VAE 86.76 / IWAE 84.78 (one
stochastic layer, MLP), 2-layer IWAE 82.90, NVAE 78.01.

A time budget (``--minutes``) is turned into a number of epochs before training starts (a short
calibration measures steps per second), so the cosine learning-rate schedule and the KL warm-up
(``beta_steps`` = 15% of all steps) fit the budget; a timer stops training at the deadline
regardless. ``--epochs`` sets the number of epochs instead (the schedule then fits those), still
stopped at the ``--minutes`` deadline.

The IW bound costs k decoder passes per image (k = 5,000 on all 10,000 test images is 50 million
passes: hours on 2 cores), so it is computed on the first ``--test_images`` test images (default
1,000, with its standard error); the negative ELBO and the active units use all 10,000.

    python -m benchmarks.quality --minutes 60                      # the full benchmark
    python -m benchmarks.quality --minutes 4 --k 500 --test_images 500   # a quick look
    python -m benchmarks.quality --epochs 3 --decoder conv               # any config key overrides the preset
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vae.config import ConfigError, add_config_arguments, config_from_args, get_benchmark_config  # noqa: E402
from vae.data import ImageBatches, load_dataset, split_train_val  # noqa: E402
from vae.evaluate import evaluate  # noqa: E402
from vae.files import write_atomic  # noqa: E402
from vae.losses import build_loss  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.train import Callback, VAETrainer, train_one_epoch  # noqa: E402
from vae import fast  # noqa: E402
from vae.checkpoint import load_model  # noqa: E402
from vae.optim import create_lr_scheduler, create_optimizer  # noqa: E402


def steps_per_second(cfg, data, steps: int = 40) -> float:
    """Optimizer steps per second of this config on this machine (after 5 warm-up steps)."""
    train_split, _ = split_train_val(data, cfg.data.val_size, cfg.run.seed)
    batches = ImageBatches(train_split, cfg.train.batch_size, binarize=cfg.data.binarize,
                           channels_last=cfg.run.channels_last, max_batches=steps + 5)
    model = VAE(**cfg.model.as_kwargs())
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = fast.accelerate(model, "cpu") if cfg.run.fast else model  # as VAETrainer.train() builds it
    optimizer = create_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay)
    scheduler = create_lr_scheduler(optimizer, "constant", 1)
    loss_fn = build_loss(cfg.loss, cfg.model, len(train_split))
    with fast.retained_heap(cfg.run.fast and cfg.run.retain_memory):  # as VAETrainer.train() runs
        batches.max_batches = 5
        train_one_epoch(model, loss_fn, optimizer, scheduler, batches, log_every=1000)
        batches.max_batches = steps + 5
        t0 = time.perf_counter()
        train_one_epoch(model, loss_fn, optimizer, scheduler, batches, start_batch=5, log_every=1000)
        return steps / (time.perf_counter() - t0)


class Deadline(Callback):
    """Stop training (after the current step) once the wall-clock budget is spent."""

    def __init__(self, seconds: float):
        self.seconds, self.timer = seconds, None

    def on_train_start(self, trainer) -> None:
        self.timer = threading.Timer(self.seconds, trainer.request_stop, args=("time budget spent",))
        self.timer.daemon = True
        self.timer.start()

    def on_train_end(self, trainer, result) -> None:
        if self.timer is not None:
            self.timer.cancel()


def score(model_path: str, data, k: int, test_images: int) -> dict:
    """Test NELBO on all test images and the IW bound with ``k`` samples on the first ``test_images``."""
    model, checkpoint = load_model(model_path)
    model = fast.accelerate(model, "cpu") if checkpoint["config"].get("fast", True) else model
    t1 = time.perf_counter()
    full = evaluate(model, data, loss_type="bce", binarize="dynamic", k=0, probe=False, fid=False)
    sub = evaluate(model, data, loss_type="bce", binarize="dynamic", k=k, probe=False, fid=False,
                   max_test_images=test_images)
    return {"eval_minutes": (time.perf_counter() - t1) / 60, "test/nelbo": full["test/nelbo"],
            "test/recon": full["test/recon"], "test/kl": full["test/kl"],
            "test/active_units": full["test/active_units"], "iw_test_images": sub["test/num_images"],
            f"test/iw_nll_k{k}": sub[f"test/iw_nll_k{k}"], f"test/iw_nll_k{k}_se": sub[f"test/iw_nll_k{k}_se"],
            "subset/nelbo": sub["test/nelbo"], "model_path": model_path}


def report(out: dict, k: int, latent_dim: int) -> None:
    """The results as a few lines: nats per image, with the protocol each number follows."""
    print(f"epochs {out['epochs']} ({out['status']}), training {out['train_minutes']:.1f} min, "
          f"evaluation {out['eval_minutes']:.1f} min")
    print(f"test NELBO (10,000 images): {out['test/nelbo']:.2f} nats (recon {out['test/recon']:.2f}, "
          f"KL {out['test/kl']:.2f}); active units {out['test/active_units']:.0f} of {latent_dim}")
    print(f"test IW bound k={k} on {int(out['iw_test_images'])} images: {out[f'test/iw_nll_k{k}']:.2f} "
          f"± {out[f'test/iw_nll_k{k}_se']:.2f} nats (NELBO on the same images {out['subset/nelbo']:.2f})")
    print(f"model: {out['model_path']} (more test images later: python -m vae.evaluate --model_path "
          f"{out['model_path']} --k {k} --no_probe --no_fid)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes (default: 60)")
    p.add_argument("--epochs", type=int, default=0,
                   help="plan N epochs instead of calibrating them (the --minutes deadline still applies)")
    p.add_argument("--k", type=int, default=5000, help="importance samples (default: 5000)")
    p.add_argument("--test_images", type=int, default=1000, help="test images for the IW bound (default: 1000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--output_dir", default="outputs/quality", help="run folder and results.json")
    add_config_arguments(p)  # any config key overrides the benchmark preset, e.g. --latent_dim 32
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = {**get_benchmark_config(), "checkpoint_dir": args.output_dir, "progress": False, "sample_every": 0,
            "device": "cpu"}
    try:
        cfg = config_from_args(args, base)
    except ConfigError as e:
        p.error(str(e))
    data = load_dataset(cfg.data.data_dir)
    n_train = len(data.train_images) - cfg.data.val_size
    steps_per_epoch = n_train // cfg.train.batch_size
    if args.epochs:
        epochs, rate = args.epochs, None
    else:
        rate = steps_per_second(cfg, data)
        # ~4% of the time goes to per-epoch validation and checkpoints; keep 6% more in hand for
        # neighbours that slow the machine down later, so the schedule ends before the deadline.
        epochs = max(1, int(args.minutes * 60 * rate * 0.90 / steps_per_epoch))
    cfg = cfg.replace(num_epochs=epochs, beta_steps=int(0.15 * epochs * steps_per_epoch))
    print(f"training {epochs} epoch(s) x {steps_per_epoch} steps"
          + (f" (calibrated {rate:.2f} steps/s for a {args.minutes:g}-minute budget)" if rate else "")
          + f"; hidden {list(cfg.model.hidden_dims)}, latent {cfg.model.latent_dim}, "
            f"beta_steps {cfg.loss.beta_steps}, {torch.get_num_threads()} thread(s)", flush=True)

    callbacks = [Deadline(args.minutes * 60)]  # the budget holds with --epochs too
    t0 = time.perf_counter()
    result = VAETrainer(cfg, callbacks, overwrite=True, data=data).train()
    train_s = time.perf_counter() - t0
    model_path = result["best_model_path"] or result["last_model_path"]
    out = score(model_path, data, args.k, args.test_images)
    out.update(epochs=result["epochs_completed"], status=result["status"], train_minutes=train_s / 60,
               config=cfg.to_dict())
    write_atomic(Path(args.output_dir) / "results.json", json.dumps(out, indent=2) + "\n")
    report(out, args.k, cfg.model.latent_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
