"""Training: ``train_one_epoch`` and ``validate`` as plain functions, ``VAETrainer`` around them.

The trainer strings the two together with EMA weights, a per-step LR schedule, β annealing,
checkpoints (``last.pth`` every epoch, ``best_model.pth`` by validation negative ELBO), sample
grids and a metrics file, all under ``<checkpoint_dir>/<experiment_name>/``. It knows nothing of
trackers or orchestrators: they observe and stop training through :class:`Callback`.

Command line: ``python -m vae.train --experiment_name my_vae --num_epochs 10`` (every config key
is a flag; ``--preset``, ``--resume``, ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping

if __name__ == "__main__" and not __package__:  # `python vae/train.py` puts vae/ itself on sys.path:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead, so `import vae` works

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from vae.config import PRESETS, Config, ConfigError, add_config_arguments, config_from_args, validate_config
from vae.data import DataError, ImageBatches, ImageData, load_dataset, split_train_val
from vae.losses import VAELoss, build_loss
from vae.model import VAE
from vae.utils import EMA, CheckpointError, FlatParameters, create_lr_scheduler, create_optimizer, get_device, \
    gradient_clip, load_checkpoint, retained_heap, save_checkpoint, set_seed

# Metric keys, defined once (flat, slash-separated; trackers log them as they are).
TRAIN_KEYS = ("train/loss", "train/recon", "train/kl", "train/tc")
VAL_KEYS = ("val/loss", "val/nelbo", "val/recon", "val/kl")
# Keys a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_OVERRIDES = frozenset({"num_epochs", "progress", "device", "log_every", "sample_every", "data_dir",
                                 "checkpoint_dir", "fast_dev_run", "retain_memory"})


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and remedies."""


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


class Callback:
    """Hooks for code outside the library (trackers, tuners). Override what you need.

    A callback stops training by calling ``trainer.request_stop(reason)``: the trainer finishes
    the current step, saves ``last.pth`` and returns. Exceptions raised in a hook propagate.
    """

    def on_train_start(self, trainer: "VAETrainer") -> None: ...

    def on_epoch_end(self, trainer: "VAETrainer", epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: "VAETrainer", path: Path, kind: str) -> None: ...

    def on_train_end(self, trainer: "VAETrainer", result: dict[str, Any]) -> None: ...


def _loss_terms(loss_fn, forward, x: torch.Tensor) -> torch.Tensor:
    """One forward pass; returns stacked (total, recon, kl, tc) per image (tc = 0 if unused)."""
    recon, mu, log_var, z = forward(x)
    if getattr(loss_fn, "needs_z", False):
        return torch.stack(loss_fn(recon, x, mu, log_var, z))
    total, rec, kl = loss_fn(recon, x, mu, log_var)
    return torch.stack((total, rec, kl, torch.zeros_like(kl)))


def train_one_epoch(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, scheduler, batches: ImageBatches,
                    *, ema: EMA | None = None, max_grad_norm: float = 1.0, start_batch: int = 0,
                    acc: torch.Tensor | None = None, log_every: int = 50, amp: bool = False,
                    step_offset: int = 0, should_stop=lambda: False, progress: tqdm | None = None,
                    forward=None, flat: FlatParameters | None = None) -> dict[str, Any]:
    """Train over the batches of ``batches.epoch`` from ``start_batch`` on.

    Sums stay on the device; the host reads them once every ``log_every`` steps (progress and
    the NaN check), so the loop never waits on the device in between.

    Args:
        forward: x -> (recon, mu, log_var, z), default ``model.forward_with_z`` (or a compiled one).
        flat: the model's :class:`~vae.utils.FlatParameters` when ``optimizer`` was built over them.
        acc: running (sum of total, recon, kl, tc, images) of the epoch so far, when resuming.
        should_stop: polled after each step; True ends the epoch early.
    Returns:
        dict with ``acc`` (the sums), ``next_batch`` (index to resume from) and ``finished``.
    Raises:
        NonFiniteLossError: the loss was NaN or infinite at some step (named in the message).
    """
    forward = forward if forward is not None else model.forward_with_z
    model.train()
    device = batches.device
    acc = acc.to(device) if acc is not None else torch.zeros(5, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    # bf16 autocast: on CUDA, and on CPUs with bf16 units (AMX / AVX512-BF16); opt-in. On the development
    # machine (Zen 5, AVX512-BF16) the float32 loop is now the faster one (BENCHMARKS.md).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp and device.type in ("cuda", "cpu") \
        else nullcontext()
    k = start_batch
    for k, (x, _) in enumerate(batches.iter_from(start_batch), start=start_batch):
        with autocast:
            terms = _loss_terms(loss_fn, forward, x)
        if flat is not None:
            flat.zero_grad()
            terms[0].backward()
            flat.clip_grad_norm_(max_grad_norm, optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
            terms[0].backward()
            gradient_clip(model, max_grad_norm)
        optimizer.step()
        scheduler.step()
        loss_fn.step()
        if ema is not None:
            ema.update(model)
        terms = terms.detach().float()
        acc[:4] += terms * x.shape[0]
        acc[4] += x.shape[0]
        bad_now = ~torch.isfinite(terms[0]) & (first_bad < 0)
        first_bad = torch.where(bad_now, step_offset + k - start_batch, first_bad)
        last = k + 1 == len(batches)
        if (k + 1) % log_every == 0 or last:
            if first_bad.item() >= 0:  # one host sync per log interval
                raise NonFiniteLossError(_nan_message(int(first_bad), batches.epoch, optimizer, max_grad_norm))
            if progress is not None:
                progress.set_postfix(loss=f"{(acc[0] / acc[4]).item():.2f}", beta=f"{getattr(loss_fn, 'beta', 1.0):.3g}")
        if progress is not None:
            progress.update(1)
        if should_stop() and not last:
            if first_bad.item() >= 0:
                raise NonFiniteLossError(_nan_message(int(first_bad), batches.epoch, optimizer, max_grad_norm))
            return {"acc": acc, "next_batch": k + 1, "finished": False}
    return {"acc": acc, "next_batch": len(batches), "finished": True}


def _nan_message(step: int, epoch: int, optimizer, max_grad_norm: float) -> str:
    lr = optimizer.param_groups[0]["lr"]
    clip = f"keep gradient clipping on (max_grad_norm is {max_grad_norm})" if max_grad_norm > 0 else \
        "turn gradient clipping on (--max_grad_norm 1.0)"
    return (f"training loss became NaN or infinite at step {step} (epoch {epoch}). "
            f"Try a lower learning rate (now {lr:.3g}, e.g. --learning_rate {lr / 10:.3g}), {clip}, "
            f"or a smaller β. The last good checkpoint was kept.")


@torch.inference_mode()
def validate(model: nn.Module, loss_fn, batches: ImageBatches, recon_type: str, seed: int = 0) -> dict[str, float]:
    """Validation metrics with fixed noise (comparable across epochs, training RNG untouched).

    Returns ``val/nelbo``, ``val/recon``, ``val/kl`` (β = 1, whatever β trains) and ``val/loss``
    (the training objective at the current β), per image.
    """
    model.eval()
    gen = torch.Generator(device=batches.device).manual_seed(seed)
    nelbo_fn = VAELoss(beta=1.0, loss_type=recon_type)
    sums = torch.zeros(5, device=batches.device)
    for x, _ in batches:
        mu, log_var = model.encode(x)
        z = model.reparameterize(mu, log_var, generator=gen)
        recon = model.decode(z, x)
        nelbo, rec, kl = nelbo_fn(recon, x, mu, log_var)
        if not getattr(loss_fn, "needs_z", False):
            loss = loss_fn(recon, x, mu, log_var)[0]
        else:  # the TC estimate needs at least two images in the batch
            loss = loss_fn(recon, x, mu, log_var, z)[0] if len(x) > 1 else nelbo
        sums += torch.stack((loss, nelbo, rec, kl, torch.ones_like(kl))) * len(x)
    sums = (sums[:4] / sums[4]).tolist()
    return dict(zip(VAL_KEYS, sums))


class VAETrainer:
    """Train a VAE from a config dict (or :class:`Config`).

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
        self.cfg = validate_config(config)
        self.callbacks = list(callbacks)
        self.resume, self.overwrite, self._data = resume, overwrite, data
        self.run_dir = Path(self.cfg.run.checkpoint_dir) / self.cfg.run.experiment_name
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.model: VAE | None = None
        self.flat: FlatParameters | None = None
        self.ema: EMA | None = None

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
        cfg = self.cfg
        state = self._check_run_dir()
        if state is not None:
            cfg = self.cfg = self._resumed_config(state)
        # A process killed mid-save leaves its temporary file (never read); this run owns the folder now.
        for stale in self.run_dir.glob(".*.pth.*.tmp"):
            stale.unlink(missing_ok=True)
        set_seed(cfg.run.seed)
        device = get_device(cfg.run.device)
        data = self._data if self._data is not None else load_dataset(cfg.data.data_dir, cfg.data.dataset)
        train_split, val_split = split_train_val(data, cfg.data.val_size, cfg.run.seed, cfg.data.max_train_samples)
        max_batches = cfg.run.fast_dev_run
        common = dict(binarize=cfg.data.binarize, seed=cfg.run.seed, device=device, channels_last=cfg.run.channels_last)
        train_batches = ImageBatches(train_split, cfg.train.batch_size, shuffle=True, drop_last=len(train_split) > cfg.train.batch_size,
                                     max_batches=max_batches, **common)
        val_batches = ImageBatches(val_split, 512, shuffle=False, max_batches=max_batches, **common)
        num_epochs = 1 if max_batches else cfg.train.num_epochs

        model = VAE(**cfg.model.as_kwargs()).to(device)
        if cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.flat = flat = FlatParameters(model)  # after every .to(): parameters become views into one tensor
        self.ema = EMA(model, cfg.train.ema_decay, flat=flat) if cfg.train.ema_decay > 0 else None
        eval_model = self.ema.module if self.ema is not None else model
        loss_fn = build_loss(cfg.loss, cfg.model, dataset_size=len(train_split))
        optimizer = create_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay, flat=flat)
        scheduler = create_lr_scheduler(optimizer, cfg.train.lr_scheduler, num_epochs * len(train_batches),
                                        cfg.train.warmup_steps)
        forward = torch.compile(model.forward_with_z) if cfg.run.compile else model.forward_with_z
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler

        start_epoch, start_batch, acc, best, step = 1, 0, None, float("inf"), 0
        if state is not None:
            start_epoch, start_batch, acc, best, step = self._restore(state, loss_fn, optimizer, scheduler)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "config.json.tmp"  # atomic: `--resume` reads it back
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(self.run_dir / "config.json")
        self.global_step = step
        fixed_z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.run.seed)).to(device)
        for cb in self.callbacks:
            cb.on_train_start(self)

        status = "completed"
        with self._signal_handlers(), retained_heap(cfg.run.retain_memory):
            for epoch in range(start_epoch, num_epochs + 1):
                train_batches.set_epoch(epoch)
                t0 = time.perf_counter()
                with tqdm(total=len(train_batches), initial=start_batch, desc=f"epoch {epoch}/{num_epochs}",
                          disable=not cfg.run.progress, leave=False, dynamic_ncols=True) as bar:
                    out = train_one_epoch(model, loss_fn, optimizer, scheduler, train_batches, ema=self.ema,
                                          max_grad_norm=cfg.train.max_grad_norm, start_batch=start_batch, acc=acc,
                                          log_every=cfg.run.log_every, amp=cfg.run.amp, step_offset=step,
                                          should_stop=lambda: self.stop_reason is not None, progress=bar,
                                          forward=forward, flat=flat)
                elapsed = time.perf_counter() - t0
                step += out["next_batch"] - start_batch
                self.global_step = step
                if not out["finished"]:
                    self._save_last(epoch - 1, step, best, loss_fn, optimizer, scheduler,
                                    partial={"epoch": epoch, "next_batch": out["next_batch"], "acc": out["acc"].cpu()})
                    status = "stopped"
                    break
                metrics = self._epoch_metrics(out["acc"], eval_model, loss_fn, val_batches, optimizer, elapsed,
                                              len(train_batches) - start_batch, cfg)
                start_batch, acc = 0, None
                self.history.append({"epoch": epoch, "step": step, **metrics})
                is_best = metrics["val/nelbo"] < best
                best = min(best, metrics["val/nelbo"])
                self._write_metrics_file()
                if cfg.run.sample_every and (epoch % cfg.run.sample_every == 0 or epoch == num_epochs):
                    self._save_samples(eval_model, fixed_z, epoch)
                if is_best:  # best before last: a kill between the two makes resume redo this epoch,
                    self._save_best(epoch, step, metrics)  # not skip a best_model.pth it never wrote
                self._save_last(epoch, step, best, loss_fn, optimizer, scheduler)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, metrics)
                if self.stop_reason is not None and epoch < num_epochs:
                    status = "stopped"
                    break

        result = {
            "status": status, "stop_reason": self.stop_reason, "run_dir": str(self.run_dir),
            "epochs_completed": self.history[-1]["epoch"] if self.history else start_epoch - 1,
            "global_step": step, "best_val_nelbo": best,
            "best_model_path": str(self.best_path) if self.best_path.exists() else None,
            "last_model_path": str(self.last_path), "history": list(self.history),
            "final_metrics": dict(self.history[-1]) if self.history else {},
        }
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    # -- internals -------------------------------------------------------------------------
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

    def _restore(self, state, loss_fn, optimizer, scheduler):
        self.model.load_state_dict(state["model_state"])
        if self.ema is not None and state.get("ema_state") is not None:
            self.ema.load_state_dict(state["ema_state"])
        self.flat.load_optimizer_state_dict(optimizer, state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        loss_fn.load_state_dict(state["loss_state"])
        torch.set_rng_state(state["rng_state"])
        if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng_state"])
        self.history = list(state["history"])
        partial = state.get("partial")
        if partial:
            return partial["epoch"], partial["next_batch"], partial["acc"], state["best_val_nelbo"], state["global_step"]
        return state["epoch"] + 1, 0, None, state["best_val_nelbo"], state["global_step"]

    def _epoch_metrics(self, acc, eval_model, loss_fn, val_batches, optimizer, elapsed, steps, cfg):
        sums = acc.tolist()
        metrics = {key: sums[i] / sums[4] for i, key in enumerate(TRAIN_KEYS)}
        if not getattr(loss_fn, "needs_z", False):
            metrics.pop("train/tc")
        metrics["train/beta"] = float(getattr(loss_fn, "beta", cfg.model.beta))
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics["train/images_per_s"] = steps * cfg.train.batch_size / max(elapsed, 1e-9)
        metrics.update(validate(eval_model, loss_fn, val_batches, cfg.loss.reconstruction_loss_type, cfg.run.seed))
        if cfg.train.val_iw_k:
            from vae.evaluate import iw_nll  # local: evaluation is optional per epoch

            metrics[f"val/iw_nll_k{cfg.train.val_iw_k}"] = iw_nll(
                eval_model, val_batches, k=cfg.train.val_iw_k, loss_type=cfg.loss.reconstruction_loss_type,
                seed=cfg.run.seed)
        return metrics

    def _base_state(self, epoch: int, step: int) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "epoch": epoch, "global_step": step,
                "model_state": self.model.state_dict(),
                "ema_state": self.ema.state_dict() if self.ema is not None else None}

    def _save_last(self, epoch, step, best, loss_fn, optimizer, scheduler, partial=None) -> None:
        state = {**self._base_state(epoch, step), "optimizer_state": self.flat.optimizer_state_dict(optimizer),
                 "scheduler_state": scheduler.state_dict(), "loss_state": loss_fn.state_dict(),
                 "rng_state": torch.get_rng_state(),
                 "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "best_val_nelbo": best, "history": self.history, "partial": partial}
        save_checkpoint(state, self.last_path)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.last_path, "last")

    def _save_best(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        save_checkpoint({**self._base_state(epoch, step), "metrics": metrics}, self.best_path)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.best_path, "best")

    def _write_metrics_file(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        tmp.replace(path)

    @torch.no_grad()
    def _save_samples(self, model: nn.Module, z: torch.Tensor, epoch: int) -> None:
        model.eval()
        path = self.run_dir / "samples" / f"epoch_{epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(model.decode(z).float().cpu(), path, nrow=8)

    @contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM: finish the step, save, return. A second Ctrl-C interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if self.stop_reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_reason = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's parser (reusable by other launchers)."""
    parser = argparse.ArgumentParser(prog="vae-train", description="Train a convolutional VAE on MNIST.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="starting configuration")
    parser.add_argument("--resume", action="store_true", help="continue this experiment from its last.pth")
    parser.add_argument("--overwrite", action="store_true", help="start afresh over an existing run folder")
    return add_config_arguments(parser)


def run_cli(main, argv=None, extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a CLI body, turning user-facing errors into one line and exit code 2.

    Args:
        main: the CLI body, ``main(argv) -> exit code``.
        extra_errors: further exception types the caller's layer raises for user-facing problems
            (e.g. an unreachable tracking server), reported the same way.
    """
    try:
        return main(argv) or 0
    except (ConfigError, DataError, CheckpointError, RunExistsError, NonFiniteLossError, *extra_errors) as e:
        text = "invalid configuration: " + "; ".join(e.problems) if isinstance(e, ConfigError) else str(e)
        print(f"error: {text}", file=sys.stderr)
        return 2


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
