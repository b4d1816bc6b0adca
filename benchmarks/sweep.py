"""Benchmark: the same Optuna sweep with and without pruning.

Runs one seeded sweep per pruner (same space, same sampler seed, same base config: a small
Bernoulli VAE on statically binarised MNIST, so values are nats), each in a fresh storage and
MLflow store, and prints total trial-epochs, wall time and best validation NELBO. The goal
(issue 5): pruning saves >= 40% of trial-epochs for a best value within 1 nat.

    VAE_DATA_DIR=/path/to/data python benchmarks/sweep.py                # 20 trials x 10 epochs, median vs none
    python benchmarks/sweep.py --n-trials 20 --epochs 6 --train-samples 4000 --pruners median hyperband none
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial")
    p.add_argument("--train-samples", type=int, default=12000, help="first N MNIST training images (val included)")
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "constant"],
                   help="the trials' learning-rate schedule (cosine: the library's default)")
    p.add_argument("--pruners", nargs="+", default=["median", "none"], choices=["median", "hyperband", "none"])
    p.add_argument("--warmup-epochs", type=int, default=0, help="median pruner: epochs before pruning may start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared CPU)")
    p.add_argument("--out", default=None, help="folder for storages and stores (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep-bench-"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["VAE_MLRUNS_DIR"] = str(out / "mlruns")  # never the project's store
    os.environ["VAE_OPTUNA_DIR"] = str(out / "optuna")
    from tuning.options import make_options
    from tuning.sweep import run_sweep

    fixed = {"num_epochs": args.epochs, "max_train_samples": args.train_samples, "val_size": args.val_size,
             "hidden_dims": [16, 32], "batch_size": 128, "reconstruction_loss_type": "bce", "binarize": "static",
             "ema_decay": 0.0, "lr_scheduler": args.lr_scheduler, "log_every": 1000}
    if os.environ.get("VAE_DATA_DIR"):
        fixed["data_dir"] = os.environ["VAE_DATA_DIR"]
    _warm_up(fixed.get("data_dir"))
    results = []
    for pruner in args.pruners:
        opts = make_options(study_name=f"bench-{pruner}", n_trials=args.n_trials, seed=args.seed, pruner=pruner,
                            pruner_warmup_epochs=args.warmup_epochs, preset="default", fixed=fixed,
                            threads=args.threads, plots=False)
        t0 = time.perf_counter()
        s = run_sweep(opts)
        results.append({"pruner": pruner, "trial_epochs": s["trial_epochs"], "wall_s": time.perf_counter() - t0,
                        "best": s["best"]["value"] if s["best"] else float("nan"), **s["counts"]})
    print(f"\n{args.n_trials} trials x {args.epochs} epochs, {args.train_samples - args.val_size} training images, "
          f"{args.val_size} validation images, {args.lr_scheduler} lr, seed {args.seed}, {args.threads} thread(s), pruner warm-up {args.warmup_epochs} epoch(s)")
    print(f"{'pruner':<10} {'complete':>8} {'pruned':>7} {'trial-epochs':>13} {'wall s':>8} {'best val NELBO':>15}")
    for r in results:
        print(f"{r['pruner']:<10} {r['complete']:>8} {r['pruned']:>7} {r['trial_epochs']:>13} {r['wall_s']:>8.1f} "
              f"{r['best']:>15.2f}")
    base = next((r for r in results if r["pruner"] == "none"), None)
    for r in results:
        if base is not None and r is not base:
            saved = 1 - r["trial_epochs"] / base["trial_epochs"]
            print(f"{r['pruner']}: {saved:.0%} fewer trial-epochs, {1 - r['wall_s'] / base['wall_s']:.0%} less wall "
                  f"time, best {r['best'] - base['best']:+.2f} nats vs no pruning")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _warm_up(data_dir: str | None) -> None:
    """Create the MLflow store and read the data once, so neither sweep's wall time pays for it."""
    from tracking import get_client
    from vae.config import get_default_config
    from vae.data import load_dataset

    get_client().search_experiments()
    load_dataset(data_dir or get_default_config()["data_dir"])


if __name__ == "__main__":
    sys.exit(main())
