"""Training: ``VAETrainer`` around the loop functions of :mod:`vae.loop`.

The trainer strings ``train_one_epoch`` and ``validate`` together with EMA weights, a per-step LR schedule, β annealing,
checkpoints (``last.pth`` every epoch, ``best_model.pth`` by validation negative ELBO), sample
grids and a metrics file, all under ``<checkpoint_dir>/<experiment_name>/``. It knows nothing of
trackers or orchestrators: they observe and stop training through :class:`vae.callbacks.Callback`.

Command line: ``python -m vae.train --experiment_name my_vae --num_epochs 10`` (every config key
is a flag; ``--preset``, ``--resume``, ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

if __name__ == "__main__" and not __package__:  # `python vae/train.py` puts vae/ itself on sys.path:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead, so `import vae` works

import torch
from torch import nn
from tqdm.auto import tqdm

from vae import fast, settings
from vae.callbacks import Callback, stop_on_signals
from vae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae.cli import run_cli
from vae.config import PRESETS, Config, ConfigError, add_config_arguments, config_from_args, validate_config
from vae.data import ImageBatches, ImageData, load_dataset, split_train_val
from vae.device import get_device, set_seed
from vae.ema import EMA
from vae.errors import UserError
from vae.figures import save_image_grid
from vae.files import write_atomic
from vae.likelihood import iw_nll
from vae.loop import TRAIN_KEYS, VAL_KEYS, NonFiniteLossError, train_one_epoch, validate
from vae.losses import build_loss
from vae.model import VAE
from vae.optim import create_lr_scheduler, create_optimizer
from vae.progress import terminal_size

__all__ = ["Callback", "NonFiniteLossError", "RunExistsError", "TRAIN_KEYS", "VAL_KEYS", "VAETrainer", "build_parser",
           "cli", "train_one_epoch", "validate"]

RESUMABLE_OVERRIDES = frozenset({"num_epochs", "progress", "device", "log_every", "sample_every", "data_dir",
                                 "checkpoint_dir", "fast_dev_run", "fast", "retain_memory"})


class RunExistsError(UserError, RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class _Loop:
    """What :meth:`VAETrainer.train` builds before the first step."""

    train_batches: ImageBatches
    val_batches: ImageBatches
    num_epochs: int
    forward: Any  # x -> (recon, mu, log_var, z): the model's, or a compiled one
    fixed_z: torch.Tensor  # the latents of every sample grid


class VAETrainer:
    """Train a VAE from a config dict (or :class:`Config`).

    With ``VAE_FAST_DEV_RUN=N`` in the environment (and ``fast_dev_run`` unset in the config)
    the run is a smoke run of 1 epoch of N batches, and a warning says so.

    Args:
        config: flat config dict as the presets return, or a validated :class:`Config`.
        callbacks: observers (see :class:`Callback`).
        resume: continue from ``last.pth`` of this run folder (exactly: optimiser, schedule,
            EMA, β schedule, RNG and position in the epoch are restored).
        overwrite: start afresh even if the run folder holds checkpoints.
        data: an already loaded dataset (skips reading the IDX files).
    Raises:
        ConfigError: the config is invalid (every bad field named).
    """

    def __init__(self, config: Mapping[str, Any] | Config, callbacks: Iterable[Callback] = (), *,
                 resume: bool = False, overwrite: bool = False, data: ImageData | None = None):
        self.cfg = _with_env_fast_dev_run(validate_config(config))
        self.callbacks = list(callbacks)
        self.resume, self.overwrite, self._data = resume, overwrite, data
        self.run_dir = Path(self.cfg.run.checkpoint_dir) / self.cfg.run.experiment_name
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.model: VAE | None = None
        self.ema: EMA | None = None
        self.global_step, self.best = 0, float("inf")

    # -- public API ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best_model.pth"

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask training to stop after the current step (thread- and signal-safe)."""
        self.stop_reason = reason

    def train(self) -> dict[str, Any]:
        """Run training to ``num_epochs`` (or until stopped). Returns a summary dict."""
        state = self._check_run_dir()
        if state is not None:
            self.cfg = self._resumed_config(state)
        for stale in self.run_dir.glob(".*.tmp"):  # a process killed mid-save leaves its temporary file
            stale.unlink(missing_ok=True)
        loop = self._build(state)
        if state is not None:  # a kill between last.pth and metrics.jsonl: the file catches up with the checkpoint
            self._write_metrics()
        for cb in self.callbacks:
            cb.on_train_start(self)
        with stop_on_signals(self), fast.retained_heap(self.cfg.run.fast and self.cfg.run.retain_memory):
            status = self._run_epochs(loop)
        result = {
            "status": status, "stop_reason": self.stop_reason, "run_dir": str(self.run_dir),
            "epochs_completed": self.history[-1]["epoch"] if self.history else self._start[0] - 1,
            "global_step": self.global_step, "best_val_nelbo": self.best,
            "best_model_path": str(self.best_path) if self.best_path.exists() else None,
            "last_model_path": str(self.last_path), "history": list(self.history),
            "final_metrics": dict(self.history[-1]) if self.history else {},
        }
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    # -- internals -------------------------------------------------------------------------
    def _build(self, state: dict[str, Any] | None) -> _Loop:
        """Seed, data, model (fast path applied), EMA, loss, optimiser, schedule; restore ``state``."""
        cfg = self.cfg
        set_seed(cfg.run.seed)
        device = get_device(cfg.run.device)
        data = self._data if self._data is not None else load_dataset(cfg.data.data_dir, cfg.data.dataset)
        train_split, val_split = split_train_val(data, cfg.data.val_size, cfg.run.seed, cfg.data.max_train_samples)
        common = dict(binarize=cfg.data.binarize, seed=cfg.run.seed, device=device, channels_last=cfg.run.channels_last,
                      max_batches=cfg.run.fast_dev_run)
        train_batches = ImageBatches(train_split, cfg.train.batch_size, shuffle=True,
                                     drop_last=len(train_split) > cfg.train.batch_size, **common)
        val_batches = ImageBatches(val_split, 512, shuffle=False, **common)

        model = VAE(**cfg.model.as_kwargs()).to(device)
        if cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model = fast.accelerate(model, device, enabled=cfg.run.fast)
        self.ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.loss_fn = build_loss(cfg.loss, cfg.model, dataset_size=len(train_split))
        self.optimizer = create_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay)
        num_epochs = 1 if cfg.run.fast_dev_run else cfg.train.num_epochs
        self.scheduler = create_lr_scheduler(self.optimizer, cfg.train.lr_scheduler,
                                             num_epochs * len(train_batches), cfg.train.warmup_steps)
        self._start = self._restore(state) if state is not None else (1, 0, None)
        write_atomic(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))  # `--resume` reads it
        forward = torch.compile(model.forward_with_z) if cfg.run.compile else model.forward_with_z
        fixed_z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
        return _Loop(train_batches, val_batches, num_epochs, forward, fixed_z.to(device))

    def _run_epochs(self, loop: _Loop) -> str:
        """Train epoch after epoch; returns 'completed' or 'stopped'."""
        cfg = self.cfg
        start_epoch, start_batch, acc = self._start
        for epoch in range(start_epoch, loop.num_epochs + 1):
            loop.train_batches.set_epoch(epoch)
            t0 = time.perf_counter()
            with tqdm(total=len(loop.train_batches), initial=start_batch, desc=f"epoch {epoch}/{loop.num_epochs}",
                      disable=not cfg.run.progress, leave=False, **terminal_size()) as bar:
                out = train_one_epoch(self.model, self.loss_fn, self.optimizer, self.scheduler, loop.train_batches,
                                      ema=self.ema, max_grad_norm=cfg.train.max_grad_norm, start_batch=start_batch,
                                      acc=acc, log_every=cfg.run.log_every, amp=cfg.run.amp,
                                      step_offset=self.global_step, should_stop=lambda: self.stop_reason is not None,
                                      progress=bar, forward=loop.forward)
            elapsed = time.perf_counter() - t0
            self.global_step += out["next_batch"] - start_batch
            if not out["finished"]:
                self._save_last(epoch - 1, partial={"epoch": epoch, "next_batch": out["next_batch"],
                                                    "acc": out["acc"].cpu()})
                return "stopped"
            images_per_s = (len(loop.train_batches) - start_batch) * cfg.train.batch_size / max(elapsed, 1e-9)
            self._end_epoch(epoch, loop, self._epoch_metrics(out["acc"], loop.val_batches, images_per_s))
            start_batch, acc = 0, None
            if self.stop_reason is not None and epoch < loop.num_epochs:
                return "stopped"
        return "completed"

    def _end_epoch(self, epoch: int, loop: _Loop, metrics: dict[str, float]) -> None:
        """Record the epoch: samples, checkpoints, then the metrics file and the callbacks (trackers)
        together, so that a failed write (a full disk) leaves both without the epoch, never one."""
        self.history.append({"epoch": epoch, "step": self.global_step, **metrics})
        is_best = metrics["val/nelbo"] < self.best
        self.best = min(self.best, metrics["val/nelbo"])
        every = self.cfg.run.sample_every
        if every and (epoch % every == 0 or epoch == loop.num_epochs):
            self._save_samples(loop.fixed_z, epoch)
        if is_best:  # best before last: a kill between the two makes resume redo this epoch,
            self._save_best(epoch, metrics)  # not skip a best_model.pth it never wrote
        self._save_last(epoch)
        self._write_metrics()
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, metrics)

    def _write_metrics(self) -> None:
        write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))

    def _check_run_dir(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None for a fresh run; refuses to clobber a run."""
        if self.resume:
            if not self.last_path.exists():
                raise CheckpointError(f"cannot resume: {self.last_path} does not exist "
                                      f"(start without --resume, or check --experiment_name)")
            return load_checkpoint(self.last_path)
        if self.last_path.exists() and not self.overwrite:
            raise RunExistsError(f"{self.run_dir} already holds a run (last.pth). Use --resume to continue it, "
                                 f"--overwrite to start over, or another --experiment_name.")
        return None

    def _resumed_config(self, state: dict[str, Any]) -> Config:
        stored = validate_config(state["config"])
        given, old = self.cfg.to_dict(), stored.to_dict()
        differs = sorted(k for k in given if given[k] != old[k] and k not in RESUMABLE_OVERRIDES)
        if differs:
            raise ConfigError([f"{k}: the run being resumed has {old[k]!r}, got {given[k]!r} "
                               f"(only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change on resume)"
                               for k in differs])
        return self.cfg

    def _restore(self, state: dict[str, Any]) -> tuple[int, int, torch.Tensor | None]:
        """Load a ``last.pth`` into the run; returns (epoch, batch, running sums) to start from."""
        self.model.load_state_dict(state["model_state"])
        if self.ema is not None and state.get("ema_state") is not None:
            self.ema.load_state_dict(state["ema_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.loss_fn.load_state_dict(state["loss_state"])
        torch.set_rng_state(state["rng_state"])
        if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng_state"])
        self.history = list(state["history"])
        self.best, self.global_step = state["best_val_nelbo"], state["global_step"]
        partial = state.get("partial")
        if partial:
            return partial["epoch"], partial["next_batch"], partial["acc"]
        return state["epoch"] + 1, 0, None

    @property
    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _epoch_metrics(self, acc: torch.Tensor, val_batches: ImageBatches, images_per_s: float) -> dict[str, float]:
        cfg, sums = self.cfg, acc.tolist()
        metrics = {key: sums[i] / sums[4] for i, key in enumerate(TRAIN_KEYS)}
        if not getattr(self.loss_fn, "needs_z", False):
            metrics.pop("train/tc")
        metrics["train/beta"] = float(getattr(self.loss_fn, "beta", cfg.model.beta))
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["train/images_per_s"] = images_per_s
        metrics.update(validate(self._eval_model, self.loss_fn, val_batches, cfg.loss.reconstruction_loss_type,
                                cfg.run.seed))
        if cfg.train.val_iw_k:
            metrics[f"val/iw_nll_k{cfg.train.val_iw_k}"] = iw_nll(
                self._eval_model, val_batches, k=cfg.train.val_iw_k, loss_type=cfg.loss.reconstruction_loss_type,
                seed=cfg.run.seed)
        return metrics

    def _base_state(self, epoch: int) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "epoch": epoch, "global_step": self.global_step,
                "model_state": self.model.state_dict(),
                "ema_state": self.ema.state_dict() if self.ema is not None else None}

    def _save_last(self, epoch: int, partial: dict[str, Any] | None = None) -> None:
        state = {**self._base_state(epoch), "optimizer_state": self.optimizer.state_dict(),
                 "scheduler_state": self.scheduler.state_dict(), "loss_state": self.loss_fn.state_dict(),
                 "rng_state": torch.get_rng_state(),
                 "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "best_val_nelbo": self.best, "history": self.history, "partial": partial}
        save_checkpoint(state, self.last_path)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.last_path, "last")

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        save_checkpoint({**self._base_state(epoch), "metrics": metrics}, self.best_path)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.best_path, "best")

    @torch.no_grad()
    def _save_samples(self, z: torch.Tensor, epoch: int) -> None:
        model = self._eval_model.eval()
        save_image_grid(model.decode(z).float().cpu(), self.run_dir / "samples" / f"epoch_{epoch:03d}.png",
                        f"{len(z)} samples from the prior after epoch {epoch} (the same z every epoch)", nrow=8)


def _with_env_fast_dev_run(cfg: Config) -> Config:
    """``cfg`` as a smoke run when ``VAE_FAST_DEV_RUN`` asks for one (with a warning saying so)."""
    batches = settings.current().fast_dev_run
    if not batches or cfg.run.fast_dev_run:
        return cfg
    warnings.warn(f"VAE_FAST_DEV_RUN={batches}: this is a smoke run of 1 epoch of {batches} batch(es); "
                  f"unset VAE_FAST_DEV_RUN for a real run", stacklevel=3)
    return cfg.replace(fast_dev_run=batches)


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's parser (reusable by other launchers)."""
    parser = argparse.ArgumentParser(prog="vae-train", description="Train a convolutional VAE on MNIST.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="starting configuration")
    parser.add_argument("--resume", action="store_true", help="continue this experiment from its last.pth")
    parser.add_argument("--overwrite", action="store_true", help="start afresh over an existing run folder")
    return add_config_arguments(parser)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base = PRESETS[args.preset]()
    if args.resume:  # the stored config is the base; flags given now override it
        run_dir = Path(args.checkpoint_dir or base["checkpoint_dir"]) / (args.experiment_name or base["experiment_name"])
        if (run_dir / "config.json").exists():
            base = json.loads((run_dir / "config.json").read_text())
    cfg = config_from_args(args, base)
    result = VAETrainer(cfg, resume=args.resume, overwrite=args.overwrite).train()
    final = result["final_metrics"]
    summary = ", ".join(f"{k}={final[k]:.3f}" for k in ("train/loss", "val/nelbo") if k in final)
    print(f"{result['status']}: {result['epochs_completed']} epoch(s), {summary}")
    print(f"best model: {result['best_model_path']}\nlast checkpoint: {result['last_model_path']}")
    if result["status"] == "stopped":
        print(f"stopped ({result['stop_reason']}); continue with --resume --experiment_name {cfg.run.experiment_name}")
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
