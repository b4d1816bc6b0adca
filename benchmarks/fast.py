"""What each piece of ``vae.fast`` saves in a training step, measured by leaving it out.

One training step of the seed's default VAE (hidden 32-64-128-256, latent 128): forward, MSE
loss, backward and the fused AdamW step, on a batch of 128 random 28×28 images, channels-last,
float32, on the CPU. Variants: everything on (what the trainer runs with ``fast: true``), each
piece left out in turn, and nothing (``fast: false``: plain ``torch.nn`` layers, glibc's default
heap). All run in one process with the same initial weights. A round runs every variant once, a
block of ``--steps`` timed steps after one untimed step (which settles the heap into the
variant's mode), so every variant sees the same slow drifts of a shared machine; the table shows
each variant's median step time and, for a piece left out, the share of the step it saves:
1 − all / without, from the median over rounds of that round's ratio.

    python -m benchmarks.fast                  # torch's default threads, 30 rounds of 3 steps
    python -m benchmarks.fast --threads 1
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks import kernel_args
from vae import fast
from vae.losses import VAELoss
from vae.model import VAE
from vae.optim import create_optimizer

PIECES = (*fast.FORMS, "heap")


def _variants() -> dict[str, tuple[tuple[str, ...], bool]]:
    """name -> (layer forms, retained heap)."""
    out = {"all (fast: true)": (fast.FORMS, True)}
    for piece in PIECES:
        out[f"without {piece}"] = (tuple(f for f in fast.FORMS if f != piece), piece != "heap")
    out["none (fast: false)"] = ((), False)
    return out


def main(argv=None) -> None:
    p = kernel_args.parser(__doc__)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=3, help="timed steps per block")
    args = kernel_args.parse(p, argv)
    torch.manual_seed(0)
    base = VAE().to(memory_format=torch.channels_last)
    variants = _variants()
    models = {name: fast.accelerate(copy.deepcopy(base), "cpu", include=forms) for name, (forms, _) in variants.items()}
    optimizers = {name: create_optimizer(m, 1e-4) for name, m in models.items()}
    loss_fn = VAELoss(1.0, "mse")
    x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def block(name: str, steps: int) -> list[float]:
        model, opt, times = models[name], optimizers[name], []
        for _ in range(steps):
            t0 = time.perf_counter()
            recon, mu, log_var = model(x)
            opt.zero_grad(set_to_none=True)
            loss_fn(recon, x, mu, log_var)[0].backward()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    rounds: list[dict[str, float]] = []
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        medians = {}
        for name, (_, heap) in variants.items():
            with fast.retained_heap(enabled=heap):
                block(name, 1)  # settles the heap into this mode
                medians[name] = statistics.median(block(name, args.steps))
        if r:
            rounds.append(medians)
    med = {name: statistics.median(row[name] for row in rounds) for name in variants}
    none_ms = med["none (fast: false)"]
    print(f"\ntraining step (forward, loss, backward, AdamW), default model, batch 128, channels-last, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} steps per variant\n")
    print("| variant | ms per step | share of the step the piece saves | speed-up over fast: false |")
    print("|---|---:|---:|---:|")
    for name, ms in med.items():
        ratio = statistics.median(row["all (fast: true)"] / row[name] for row in rounds)
        share = f"{100 * (1 - ratio):.1f}%" if name.startswith("without") else ""
        print(f"| {name} | {ms:.1f} | {share} | {none_ms / ms:.2f} |")


if __name__ == "__main__":
    main()
