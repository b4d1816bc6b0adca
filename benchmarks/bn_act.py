"""BatchNorm2d + LeakyReLU of the default model: PyTorch's two ops against ``vae.fast.bn_act``'s kernel;
then the decoder's last stage (BatchNorm, LeakyReLU, output conv) in three forms: plain, ``bn_act`` +
``output_conv``, and ``bn_act_conv``'s one kernel.

Each BatchNorm of the default model (batch 128; training mode, forward + backward: input, weight
and bias gradients), in channels-last and contiguous memory, float32 on the CPU, under
``retained_heap`` as training runs. Both forms run interleaved in each of ``--rounds`` rounds of
``--repeats`` timed calls; the table shows the fastest round's medians.

    python -m benchmarks.bn_act
    python -m benchmarks.bn_act --threads 1
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from benchmarks import kernel_args
from vae.fast import bn_act, retained_heap
from vae import fast
from vae.fast.bn_act import BatchNormAct
from vae.fast.bn_act_conv import NormActConv

BATCH = 128
SHAPES = [(32, 28), (32, 14), (64, 7), (128, 4), (256, 2)]  # (channels, map size) of the default model's BatchNorms


def _time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median forward and backward ms of ``repeats`` calls after one untimed call."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        inp = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        y = module(inp)
        t1 = time.perf_counter()
        y.backward(grad)
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0), bwd.append(t2 - t1)
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3


def main(argv=None) -> None:
    p = kernel_args.parser(__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per form and round")
    args = kernel_args.parse(p, argv)
    if bn_act.library() is None:
        raise SystemExit("error: the kernel was not built (no C++ compiler; set CXX): nothing to compare")
    torch.manual_seed(0)
    rows = ["| BatchNorm | map | memory | PyTorch fwd ms | bwd ms | kernel fwd ms | bwd ms | speed-up (fwd + bwd) |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    with retained_heap():
        for channels, size in SHAPES:
            norm, act = nn.BatchNorm2d(channels), nn.LeakyReLU(0.2)
            forms = {"plain": nn.Sequential(norm, act), "kernel": BatchNormAct.from_plain(copy.deepcopy(norm), act)}
            for layout in (torch.channels_last, torch.contiguous_format):
                x = torch.randn(BATCH, channels, size, size).contiguous(memory_format=layout)
                grad = torch.randn_like(x)
                (pf, pb), (kf, kb) = _fastest(forms, x, grad, args).values()
                memory = "channels-last" if layout is torch.channels_last else "contiguous"
                rows.append(f"| {channels} | {size}×{size} | {memory} | {pf:.2f} | {pb:.2f} | {kf:.2f} | {kb:.2f} "
                            f"| {(pf + pb) / (kf + kb):.2f} |")
    print(f"batch {BATCH}, float32, {torch.get_num_threads()} thread(s), training mode, "
          f"fastest of {args.rounds} rounds of {args.repeats} calls\n")
    print("\n".join(rows))
    print("\nthe last stage: BatchNorm 32 -> LeakyReLU -> conv 32->1 at 28×28, channels-last\n")
    print("\n".join(_last_stage(args)))


def _last_stage(args) -> list[str]:
    """Rows of the last-stage table: each form's forward and backward ms (fastest round)."""
    plain = nn.Sequential(nn.Sequential(nn.BatchNorm2d(32), nn.LeakyReLU(0.2)), nn.Conv2d(32, 1, 3, padding=1))
    forms = {"plain layers": plain,
             "bn_act + output_conv": fast.accelerate(copy.deepcopy(plain), "cpu", include=("output_conv", "bn_act")),
             "bn_act_conv": NormActConv.from_plain(copy.deepcopy(plain))}
    x = torch.randn(BATCH, 32, 28, 28).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(BATCH, 1, 28, 28)
    with retained_heap():
        times = _fastest(forms, x, grad, args)
    rows = ["| form | fwd ms | bwd ms | speed-up over plain (fwd + bwd) |", "|---|---:|---:|---:|"]
    base = sum(times["plain layers"])
    for name, (f, b) in times.items():
        rows.append(f"| {name} | {f:.2f} | {b:.2f} | {base / (f + b):.2f} |")
    return rows


def _fastest(forms: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, args) -> dict[str, tuple[float, float]]:
    """name -> (forward, backward) ms of each form's fastest round, the forms interleaved in each round."""
    rounds = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, module in forms.items():
            rounds[name].append(_time(module, x, grad, args.repeats))
    return {name: min(times, key=sum) for name, times in rounds.items()}


if __name__ == "__main__":
    main()
