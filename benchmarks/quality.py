"""Likelihood benchmark: train ``get_benchmark_config()`` on the CPU, report the test IW bound.

Protocol of the published numbers: Bernoulli decoder (BCE), dynamically binarised MNIST for
training, one fixed binarisation of the test images, the importance-weighted bound (Burda et al.
2015), nats per image. Anchors: VAE 86.76 / IWAE 84.78 (one stochastic layer, MLP), 2-layer IWAE
82.90, PixelVAE 79.02, NVAE 78.01.

A time budget (``--minutes``) is turned into a number of epochs before training starts (a short
calibration measures steps per second: the fastest of three stretches of 60 steps), so the cosine
learning-rate schedule and the KL warm-up (``beta_steps`` = 15% of all steps) fit the budget; a
timer stops training at the deadline regardless. ``--epochs`` sets the number of epochs instead (the
schedule then fits those), still stopped at the ``--minutes`` deadline. Model selection uses the
validation split only. Where the CPU has bf16 units and ``--amp`` is not given, the calibration
times float32 and bf16 autocast and trains with the faster; every bound is computed in float32.

The defaults are the record run: the IW bound with k = 1,000 on all 10,000 test images, then
k = 5,000 on the first ``--check_images`` to show the bound has converged (their paired
difference), then the time-to-quality curve: every ``--snapshot_minutes`` of training the best
model so far (by validation) is kept, and each is scored afterwards with ``--curve_k`` samples on
the first ``--curve_images`` test images. ``--use_latent false`` runs the z-removed ablation (the
same decoder without z); its importance weights all equal p(x), so k = 1 is exact and is used.

Training leaves ``training.json`` (the model, the snapshots, the minutes) in ``--output_dir`` and
each evaluation stage is saved to ``evaluation.json`` when it ends, so ``--evaluate_only`` scores a
trained run again in a fresh process and keeps the stages already scored with the same settings.

    python -m benchmarks.quality                                   # the record run (60 minutes + evaluation)
    python -m benchmarks.quality --use_latent false                # the same decoder with z removed
    python -m benchmarks.quality --evaluate_only                   # score the trained run again (resumes)
    python -m benchmarks.quality --minutes 4 --k 100 --test_images 500 --check_k 0   # a quick look
    python -m benchmarks.quality --epochs 3 --decoder conv         # any config key overrides the preset
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vae.config import (Config, ConfigError, add_config_arguments, config_from_args, get_benchmark_config,  # noqa: E402
                        validate_config)
from vae.data import ImageBatches, Split, load_dataset, split_train_val  # noqa: E402
from vae.paired import paired_difference, per_image_scores  # noqa: E402
from vae.figures import plot_time_to_quality  # noqa: E402
from benchmarks.memory import peak_rss_bytes  # noqa: E402
from benchmarks.time_to_quality import run_label  # noqa: E402
from vae.evaluate import evaluate  # noqa: E402
from vae.files import write_atomic  # noqa: E402
from vae.losses import build_loss  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.train import Callback, VAETrainer, train_one_epoch  # noqa: E402
from vae import fast  # noqa: E402
from vae.checkpoint import load_model  # noqa: E402
from vae.device import cpu_has_bf16_units  # noqa: E402
from vae.optim import create_lr_scheduler, create_optimizer  # noqa: E402


CALIBRATION_ROUNDS = 3  # timed stretches of 60 steps per precision; the fastest plans the epochs


def steps_per_second(cfg, data, steps: int = 60, warmup: int = 20, rounds: int = 1) -> float:
    """Optimizer steps per second of this config on this machine, after ``warmup`` steps: the fastest
    of ``rounds`` timed stretches of ``steps`` (a neighbour on the machine only ever slows one down).

    The first steps run slower (oneDNN builds its kernels, the heap grows). With 5 warm-up and 40
    timed steps, a run with a 4-layer head was planned at 4.97 steps/s, then ran at 5.5 steps/s in
    its first epoch and ~6.1 later, so its schedule ended well before its deadline. One stretch of
    60 steps planned a bf16 run at 10.44 steps/s on a 2-core AMD EPYC that then trained at ~12.4.
    """
    train_split, _ = split_train_val(data, cfg.data.val_size, cfg.run.seed)
    batches = ImageBatches(train_split, cfg.train.batch_size, binarize=cfg.data.binarize,
                           channels_last=cfg.run.channels_last, max_batches=warmup + rounds * steps)
    model = VAE(**cfg.model.as_kwargs())
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = fast.accelerate(model, "cpu", enabled=cfg.run.fast)  # as VAETrainer.train() builds it
    optimizer = create_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay)
    scheduler = create_lr_scheduler(optimizer, "constant", 1)
    loss_fn = build_loss(cfg.loss, cfg.model, len(train_split))
    rates = []
    with fast.retained_heap(cfg.run.fast and cfg.run.retain_memory):  # as VAETrainer.train() runs
        batches.max_batches = warmup
        train_one_epoch(model, loss_fn, optimizer, scheduler, batches, log_every=1000, amp=cfg.run.amp)
        for start in range(warmup, warmup + rounds * steps, steps):
            batches.max_batches = start + steps
            t0 = time.perf_counter()
            train_one_epoch(model, loss_fn, optimizer, scheduler, batches, start_batch=start, log_every=1000,
                            amp=cfg.run.amp)
            rates.append(steps / (time.perf_counter() - t0))
    return max(rates)


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


class Snapshots(Callback):
    """Every ``every_s`` seconds of training, keep a copy of the best model so far (by validation),
    and the final one: the points of the time-to-quality curve, scored after training."""

    def __init__(self, every_s: float, folder: str | Path):
        self.every_s, self.folder, self.taken = every_s, Path(folder), []
        self.t0, self.best = 0.0, None

    def on_train_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

    def on_checkpoint(self, trainer, path, kind: str) -> None:
        if kind == "best":
            self.best = Path(path)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if self.every_s > 0 and time.perf_counter() - self.t0 >= self.every_s * (len(self.taken) + 1):
            self._take(epoch)

    def on_train_end(self, trainer, result: dict) -> None:
        if self.every_s > 0 and (not self.taken or self.taken[-1]["epoch"] != result["epochs_completed"]):
            self._take(result["epochs_completed"])

    def _take(self, epoch: int) -> None:
        if self.best is None:
            return
        minutes = (time.perf_counter() - self.t0) / 60
        dest = self.folder / f"epoch_{epoch:04d}.pth"
        write_atomic(dest, self.best.read_bytes())
        self.taken.append({"minutes": round(minutes, 3), "epoch": epoch, "path": str(dest)})


def _load(model_path: str | Path):
    model, checkpoint = load_model(model_path)
    return fast.accelerate(model, "cpu", enabled=checkpoint["config"].get("fast", True))


def score(model_path: str, data, k: int, test_images: int, seed: int = 0) -> dict:
    """The IW bound with ``k`` samples on the first ``test_images`` (0 = all) and the negative ELBO,
    KL and active units on all test images; the process's peak resident memory after it."""
    model, t1 = _load(model_path), time.perf_counter()
    sub = evaluate(model, data, loss_type="bce", binarize="dynamic", k=k, probe=False, fid=False,
                   max_test_images=test_images, seed=seed)
    full = sub if sub["test/num_images"] == len(data.test_images) else evaluate(
        model, data, loss_type="bce", binarize="dynamic", k=0, probe=False, fid=False, seed=seed)
    return {"eval_minutes": (time.perf_counter() - t1) / 60, "k": k, "test/nelbo": full["test/nelbo"],
            "test/recon": full["test/recon"], "test/kl": full["test/kl"],
            "test/active_units": full["test/active_units"], "iw_test_images": sub["test/num_images"],
            "test/iw_nll": sub[f"test/iw_nll_k{k}"], "test/iw_nll_se": sub[f"test/iw_nll_k{k}_se"],
            "subset/nelbo": sub["test/nelbo"], "model_path": model_path, "peak_resident_gb": peak_rss_bytes() / 1e9}


def convergence(model_path: str, data, k: int, check_k: int, images: int, seed: int = 0) -> dict:
    """The bound with ``check_k`` against ``k`` samples on the same first ``images`` test images:
    the mean paired difference (and its standard error) says whether k samples have converged."""
    model, t1 = _load(model_path), time.perf_counter()
    test = Split(data.test_images[:images], data.test_labels[:images])
    bounds = [per_image_scores(model, test, loss_type="bce", binarize="dynamic", k=n, seed=seed) for n in (k, check_k)]
    paired = paired_difference(*bounds)
    return {"images": paired["images"], "k": k, "check_k": check_k, "bound_k": paired["mean_a"],
            "bound_check_k": paired["mean_b"], "difference": paired["difference"], "difference_se": paired["se"],
            "minutes": (time.perf_counter() - t1) / 60}


def quality_curve(snapshots: list[dict], data, k: int, images: int, seed: int = 0) -> list[dict]:
    """Each snapshot's IW bound (``k`` samples, first ``images`` test images) against training minutes."""
    rows = []
    for snap in snapshots:
        m = evaluate(_load(snap["path"]), data, loss_type="bce", binarize="dynamic", k=k, probe=False,
                     fid=False, max_test_images=images, seed=seed)
        rows.append({"minutes": snap["minutes"], "epoch": snap["epoch"], "k": k, "images": int(m["test/num_images"]),
                     "iw_nll": m[f"test/iw_nll_k{k}"], "iw_nll_se": m[f"test/iw_nll_k{k}_se"]})
    return rows


def report(out: dict, latent_dim: int) -> None:
    """The results as a few lines: nats per image, with the protocol each number follows."""
    k = out["k"]
    peak = out.get("peak_resident_gb")  # absent from a bound saved before it was recorded
    print(f"epochs {out['epochs']} ({out['status']}), training {out['train_minutes']:.1f} min, "
          f"evaluation {out['eval_minutes']:.1f} min" + (f" (process peak {peak:.1f} GB resident)" if peak else ""))
    print(f"test NELBO (all test images): {out['test/nelbo']:.2f} nats "
          f"(recon {out['test/recon']:.2f}, KL {out['test/kl']:.2f}); active units "
          f"{out['test/active_units']:.0f} of {latent_dim}")
    print(f"test IW bound k={k} on {int(out['iw_test_images'])} images: {out['test/iw_nll']:.2f} "
          f"± {out['test/iw_nll_se']:.2f} nats (NELBO on the same images {out['subset/nelbo']:.2f})")
    check = out.get("convergence")
    if check:
        print(f"k={check['check_k']} vs k={check['k']} on the first {check['images']} test images: "
              f"{check['bound_check_k']:.3f} vs {check['bound_k']:.3f} nats, difference "
              f"{check['difference']:.3f} ± {check['difference_se']:.3f} ({check['minutes']:.1f} min)")
    for row in out.get("curve", []):
        print(f"  after {row['minutes']:5.1f} min (epoch {row['epoch']:3d}): IW bound k={row['k']} on "
              f"{row['images']} test images {row['iw_nll']:.2f} ± {row['iw_nll_se']:.2f} nats")
    print(f"model: {out['model_path']}\nthe same run through the pipeline (MLflow): {out['pipeline_command']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes (default: 60)")
    p.add_argument("--epochs", type=int, default=0,
                   help="plan N epochs instead of calibrating them (the --minutes deadline still applies)")
    p.add_argument("--k", type=int, default=1000, help="importance samples of the reported bound (default: 1000)")
    p.add_argument("--test_images", type=int, default=0, help="first N test images for the bound (0 = all 10,000)")
    p.add_argument("--check_k", type=int, default=5000, help="samples of the convergence check (0 = skip)")
    p.add_argument("--check_images", type=int, default=200, help="test images of the convergence check")
    p.add_argument("--snapshot_minutes", type=float, default=5.0, help="time-to-quality points (0 = none)")
    p.add_argument("--curve_k", type=int, default=100, help="samples per time-to-quality point")
    p.add_argument("--curve_images", type=int, default=1000, help="test images per time-to-quality point")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = torch's default)")
    p.add_argument("--eval_threads", type=int, default=0, help="torch threads for evaluation (0 = every core)")
    p.add_argument("--output_dir", default="outputs/quality", help="run folder and results.json")
    p.add_argument("--evaluate_only", action="store_true",
                   help="score the run already trained in --output_dir again, keeping the stages already scored")
    add_config_arguments(p)  # any config key overrides the benchmark preset, e.g. --latent_dim 32
    return p


def fastest_precision(cfg, data, amp_given: bool):
    """(config, its steps/s): with bf16 autocast (``amp``) where it trains faster than float32.

    Only where the CPU multiplies bf16 natively and ``--amp`` was not given: both are calibrated and
    the faster kept (on an Intel Xeon with AMX, 1.43× for the preset; BENCHMARKS.md, "Likelihood").
    The bound is always computed in float32.
    """
    if amp_given or cfg.run.device != "cpu" or not cpu_has_bf16_units():
        return cfg, steps_per_second(cfg, data, rounds=CALIBRATION_ROUNDS)
    rates = {amp: steps_per_second(cfg.replace(amp=amp), data, rounds=CALIBRATION_ROUNDS) for amp in (False, True)}
    amp = rates[True] > rates[False]
    print(f"float32 {rates[False]:.2f} steps/s, bf16 autocast {rates[True]:.2f}: "
          f"{'bf16 autocast' if amp else 'float32'} (--amp true/false to choose)", flush=True)
    return cfg.replace(amp=amp), rates[amp]


def plan(cfg, data, args):
    """The config with ``num_epochs`` and ``beta_steps`` fitted to the budget (or ``--epochs``)."""
    steps_per_epoch = (len(data.train_images) - cfg.data.val_size) // cfg.train.batch_size
    if args.epochs:
        epochs, rate = args.epochs, None
    else:
        cfg, rate = fastest_precision(cfg, data, amp_given=getattr(args, "amp", None) is not None)
        # ~4% of the time goes to per-epoch validation and checkpoints; keep 6% more in hand for
        # neighbours that slow the machine down later, so the schedule ends before the deadline.
        epochs = max(1, int(args.minutes * 60 * rate * 0.90 / steps_per_epoch))
    cfg = cfg.replace(num_epochs=epochs, beta_steps=int(0.15 * epochs * steps_per_epoch))
    print(f"training {epochs} epoch(s) x {steps_per_epoch} steps"
          + (f" (calibrated {rate:.2f} steps/s for a {args.minutes:g}-minute budget)" if rate else "")
          + f"; hidden {list(cfg.model.hidden_dims)}, latent {cfg.model.latent_dim}"
            f"{'' if cfg.model.use_latent else ' (removed: use_latent false)'}, "
            f"beta_steps {cfg.loss.beta_steps}, {torch.get_num_threads()} thread(s)"
          + (", bf16 autocast" if cfg.run.amp else ""), flush=True)
    return cfg


class SnapshotsGone(Exception):
    """The curve has to be scored, and the snapshot files it needs are no longer there."""


def evaluate_run(args, cfg, data, run: dict, out_dir: Path) -> dict:
    """Score the run: the reported bound, the convergence check, the time-to-quality curve.

    Each stage's result is saved to ``evaluation.json`` as soon as it is done, with the settings it
    used; a rerun (``--evaluate_only``) keeps the stages whose settings are unchanged, so an
    evaluation that was stopped loses only the stage it was in.
    """
    torch.set_num_threads(args.eval_threads or os.cpu_count() or 1)
    k, seed = (args.k if cfg.model.use_latent else 1), cfg.run.seed  # without z every weight is p(x): k = 1 is exact
    model_path, taken = run["model_path"], run["snapshots"]
    saved = out_dir / "evaluation.json"
    stages = json.loads(saved.read_text()) if saved.exists() else {}

    def stage(name: str, settings: dict, compute):
        if stages.get(name, {}).get("settings") != settings:
            stages[name] = {"settings": settings, "result": compute()}
            write_atomic(saved, json.dumps(stages, indent=2) + "\n")
        return stages[name]["result"]

    out = stage("score", {"model": model_path, "k": k, "test_images": args.test_images, "seed": seed},
                lambda: score(model_path, data, k, args.test_images, seed))
    if args.check_k and cfg.model.use_latent:
        out["convergence"] = stage(
            "convergence", {"model": model_path, "k": args.k, "check_k": args.check_k, "images": args.check_images,
                            "seed": seed},
            lambda: convergence(model_path, data, args.k, args.check_k, args.check_images, seed))
    curve_k = args.curve_k if cfg.model.use_latent else 1

    def curve():  # the snapshots are needed only for a curve not scored yet with these settings
        gone = [snap["path"] for snap in taken if not Path(snap["path"]).exists()]
        if gone:
            raise SnapshotsGone(f"the time-to-quality snapshots are gone ({', '.join(gone)}): the curve saved in "
                                f"{saved} can be kept with its own --curve_k and --curve_images, not scored anew")
        return quality_curve(taken, data, curve_k, args.curve_images, seed)

    out["curve"] = stage("curve", {"snapshots": [s["path"] for s in taken], "k": curve_k, "images": args.curve_images,
                                   "seed": seed}, curve)
    out["pipeline_command"] = pipeline_command(cfg, k, args.test_images)
    return out


def pipeline_command(cfg, k: int, test_images: int) -> str:
    """The ``vae-pipeline`` command that trains and scores this run again, into MLflow: the preset
    with every key this run changed (the fitted epochs and warm-up among them), the same k."""
    preset = validate_config(get_benchmark_config()).to_dict()
    flags = []
    for key, value in cfg.to_dict().items():
        if value != preset[key] and key not in ("checkpoint_dir", "progress"):
            if isinstance(value, list):
                text = " ".join(map(str, value))
            else:
                text = shlex.quote(str(value).lower() if isinstance(value, bool) else str(value))
            flags.append(f"--{key} {text}")
    eval_flags = f"--iw_k {k}" + (f" --eval_max_images {test_images}" if test_images else "")
    return " ".join(["vae-pipeline --preset benchmark", *flags, eval_flags])


def train_run(args, cfg, data, out_dir: Path) -> dict:
    """Train within the budget; the run's record (model, snapshots, minutes) goes to ``training.json``."""
    for stale in ("training.json", "evaluation.json"):  # an earlier run's record and scores in this folder
        (out_dir / stale).unlink(missing_ok=True)
    threads = torch.get_num_threads()
    snapshots = Snapshots(args.snapshot_minutes * 60, out_dir / "snapshots")
    t0 = time.perf_counter()
    result = VAETrainer(cfg, [Deadline(args.minutes * 60), snapshots], overwrite=True, data=data).train()
    run = {"model_path": result["best_model_path"] or result["last_model_path"], "snapshots": snapshots.taken,
           "epochs": result["epochs_completed"], "status": result["status"],
           "train_minutes": (time.perf_counter() - t0) / 60, "train_threads": threads, "config": cfg.to_dict()}
    write_atomic(out_dir / "training.json", json.dumps(run, indent=2) + "\n")
    return run


def trained_run(p: argparse.ArgumentParser, args, out_dir: Path) -> tuple[dict, Config]:
    """The record ``train_run`` left in ``out_dir`` and its config (``--data_dir`` applied), for
    ``--evaluate_only`` (a clear error if there is none)."""
    changed = sorted(key for key in validate_config(get_benchmark_config()).to_dict()
                     if getattr(args, key, None) is not None and key != "data_dir")
    if changed:
        p.error(f"--evaluate_only scores the run in {out_dir} as it was trained: drop "
                + " ".join(f"--{key}" for key in changed) + " (only --data_dir may change)")
    try:
        run = json.loads((out_dir / "training.json").read_text())
        cfg = config_from_args(args, run["config"])
        run["config"] = cfg.to_dict()
        missing = not Path(run["model_path"]).exists()
    except FileNotFoundError:
        p.error(f"no training.json in {out_dir}: train first (the same command without --evaluate_only)")
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        p.error(f"{out_dir / 'training.json'} is not a record of benchmarks/quality.py ({type(e).__name__}: {e})")
    if missing:
        p.error(f"{out_dir / 'training.json'} names a model file that is gone: {run['model_path']}")
    return run, cfg


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("k", "check_images", "curve_k", "curve_images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    if args.evaluate_only:
        run, cfg = trained_run(p, args, out_dir)
    else:
        base = {**get_benchmark_config(), "checkpoint_dir": args.output_dir, "progress": False, "sample_every": 0,
                "device": "cpu"}
        try:
            cfg = config_from_args(args, base)
        except ConfigError as e:
            p.error(str(e))
    data = load_dataset(cfg.data.data_dir)
    if not args.evaluate_only:
        cfg = plan(cfg, data, args)
        run = train_run(args, cfg, data, out_dir)
    try:
        out = evaluate_run(args, cfg, data, run, out_dir)
    except SnapshotsGone as e:
        p.error(str(e))
    out.update({key: run[key] for key in ("epochs", "status", "train_minutes", "train_threads", "config")})
    if out["curve"]:
        plot_time_to_quality({run_label(out): out["curve"]}, out_dir / "time_to_quality.png")
    write_atomic(out_dir / "results.json", json.dumps(out, indent=2) + "\n")
    report(out, cfg.model.latent_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
