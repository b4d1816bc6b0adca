"""The trainer's loop with the model's parameters in one flat tensor (``FlatParameters``, what
``VAETrainer`` uses) against one tensor per parameter.

Both run ``vae.train.train_one_epoch`` (forward, backward, gradient clipping, fused AdamW, the EMA)
on the seed's default model, channels-last, batch 128, over the same MNIST batches, under
``retained_heap``; epochs interleaved (flat, per-tensor, flat, ...), the first dropped. With
flat parameters the clipping, the optimizer and the EMA each run one operation per group instead
of one per tensor, and the clipping's scale goes to the fused AdamW step.

    VAE_DATA_DIR=../shared/data python -m benchmarks.flat
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vae.data import ImageBatches, load_dataset, split_train_val
from vae.losses import VAELoss
from vae.model import VAE
from vae.train import train_one_epoch
from vae.utils import EMA, FlatParameters, create_lr_scheduler, create_optimizer, retained_heap


def _setup(flat: bool):
    torch.manual_seed(0)
    model = VAE().to(memory_format=torch.channels_last)
    params = FlatParameters(model) if flat else None
    optimizer = create_optimizer(model, 1e-3, 1e-4, flat=params)
    return dict(model=model, flat=params, ema=EMA(model, 0.999, flat=params), optimizer=optimizer,
                scheduler=create_lr_scheduler(optimizer, "cosine", 10_000), loss_fn=VAELoss(1.0, "mse"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per variant (one more warms up)")
    p.add_argument("--train-samples", type=int, default=6144)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(os.environ.get("VAE_DATA_DIR", "./data"))
    train, _ = split_train_val(data, 1024, seed=42, max_train_samples=args.train_samples + 1024)
    batches = ImageBatches(train, 128, shuffle=True, drop_last=True, seed=0, device=torch.device("cpu"),
                           channels_last=True)
    variants = {"FlatParameters (the trainer's)": _setup(True), "one tensor per parameter": _setup(False)}
    times = {name: [] for name in variants}
    with retained_heap():
        for epoch in range(args.epochs + 1):
            for name, v in variants.items():
                batches.set_epoch(epoch + 1)
                t0 = time.perf_counter()
                train_one_epoch(v["model"], v["loss_fn"], v["optimizer"], v["scheduler"], batches, ema=v["ema"],
                                flat=v["flat"])
                if epoch:
                    times[name].append((time.perf_counter() - t0) / len(batches) * 1e3)
    base = statistics.median(times["one tensor per parameter"])
    print(f"\ntrain_one_epoch, default model, batch 128, {torch.get_num_threads()} thread(s), "
          f"{len(batches)} steps x {args.epochs} epochs each\n")
    print("| parameters | ms per step (median epoch) | speed-up | epochs (ms per step) |\n|---|---:|---:|---|")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"| {name} | {ms:.1f} | {base / ms:.3f} | {', '.join(f'{x:.1f}' for x in t)} |")


if __name__ == "__main__":
    main()
