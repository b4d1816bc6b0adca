"""Training speed of the benchmark preset and variants of it: what an idea costs per step.

Each variant is the preset (``get_benchmark_config()``) with config flags over it, e.g.
``"--amp true"`` or ``"--ar_layers 5"``; the empty string is the preset itself. A round measures
every variant once, the way ``benchmarks/quality.py`` plans its epochs (a fresh model, 20 warm-up
steps, then 60 timed optimizer steps on real MNIST, under the trainer's heap), so all variants see
the same drifts of a shared machine; the table shows each variant's median over rounds and its
ratio to the first variant, the median of the rounds' ratios.

    python -m benchmarks.preset_speed --threads 2     # the preset, bf16 autocast, a 5-layer head, batch 256
    python -m benchmarks.preset_speed --threads 2 "" "--ar_channels 48" --rounds 3
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quality import steps_per_second  # noqa: E402
from vae.config import ConfigError, add_config_arguments, config_from_args, get_benchmark_config  # noqa: E402
from vae.data import load_dataset  # noqa: E402

VARIANTS = ("", "--amp true", "--ar_layers 5", "--batch_size 256")


def variant_configs(p: argparse.ArgumentParser, variants: list[str], data_dir: str | None) -> dict:
    """name -> Config: each variant's flags over the benchmark preset (a clear error for a bad flag)."""
    flags = add_config_arguments(argparse.ArgumentParser(prog="variant", add_help=False))
    base = {**get_benchmark_config(), "device": "cpu", "progress": False}
    if data_dir:
        base["data_dir"] = data_dir
    out = {}
    for text in variants:
        flags.error = lambda message, text=text: p.error(f"variant {text!r}: {message}")
        ns, extra = flags.parse_known_args(shlex.split(text))
        if extra:
            flags.error(f"not a config flag: {' '.join(extra)} (e.g. --amp true, --ar_layers 5)")
        try:
            out[text or "preset"] = config_from_args(ns, base)
        except ConfigError as e:
            flags.error(str(e))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="*", default=list(VARIANTS),
                   help='config flags over the preset, one string per variant ("" = the preset; default: '
                        + ", ".join(repr(v) for v in VARIANTS) + ")")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data_dir", default=None, help="the MNIST folder (default: the preset's, VAE_DATA_DIR or ./data)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = variant_configs(p, args.variants, args.data_dir)
    data = load_dataset(next(iter(configs.values())).data.data_dir)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, cfg in configs.items():
            rates[name].append(steps_per_second(cfg, data))
            print(f"round {r + 1}: {name}: {rates[name][-1]:.2f} steps/s", flush=True)
    first = next(iter(rates))
    print(f"\n| variant | steps/s (median of {args.rounds}) | images/s | × {first} |\n|---|---:|---:|---:|")
    for name, cfg in configs.items():
        steps = statistics.median(rates[name])
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[first]))
        print(f"| {name} | {steps:.2f} | {steps * cfg.train.batch_size:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
