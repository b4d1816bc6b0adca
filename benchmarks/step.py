"""One training step of the default model, four ways: the library's layers or plain torch.nn layers,
under glibc's default heap or ``retained_heap``.

A forward pass, the MSE loss and a backward pass of the seed's default VAE (hidden 32-64-128-256,
latent 128) on a batch of 128 random 28×28 images, channels-last, on the CPU. "plain" is the same
model in plain torch.nn layers (``benchmarks._reference.plain_twin``), with the same parameters.
All four run in one process, in blocks of ``--steps`` steps, interleaved over ``--rounds`` rounds;
the table shows the median step time of each, and the minor page faults per step (the kernel
mapping fresh pages).

    python -m benchmarks.step                 # 2 threads (torch's default here), 8 rounds of 10 steps
    python -m benchmarks.step --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from benchmarks._reference import plain_twin
from vae.losses import VAELoss
from vae.model import VAE
from vae.utils import retained_heap


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = VAE()
    models = {"vae.model layers": ours, "plain torch.nn layers": plain_twin(ours)}
    models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    loss_fn = VAELoss(1.0, "mse")
    x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def block(model: VAE) -> tuple[list[float], float]:
        times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.steps):
            t0 = time.perf_counter()
            recon, mu, log_var = model(x)
            model.zero_grad(set_to_none=True)
            loss_fn(recon, x, mu, log_var)[0].backward()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps

    runs = {(layers, heap): ([], []) for heap in ("glibc default", "retained_heap") for layers in models}
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for (layers, heap), (times, faults) in runs.items():
            with retained_heap(enabled=heap == "retained_heap"):
                block(models[layers])  # one block to settle the heap into this mode
                t, f = block(models[layers])
            if r:
                times.extend(t)
                faults.append(f)
    base = statistics.median(runs["plain torch.nn layers", "glibc default"][0])
    print(f"\nforward + loss + backward, batch 128, {torch.get_num_threads()} thread(s), "
          f"medians of {args.rounds} x {args.steps} steps\n")
    print("| layers | heap | ms per step | speed-up | page faults per step |\n|---|---|---:|---:|---:|")
    for (layers, heap), (times, faults) in runs.items():
        ms = statistics.median(times)
        print(f"| {layers} | {heap} | {ms:.1f} | {base / ms:.2f} | {statistics.median(faults):.0f} |")


if __name__ == "__main__":
    main()
