"""One epoch of training and one validation pass, as plain functions of a model and its batches.

:func:`train_one_epoch` runs the optimiser steps of an epoch (resumable from any batch) and
:func:`validate` scores the validation batches with fixed noise. :class:`vae.train.VAETrainer`
strings them together with EMA weights, checkpoints and callbacks.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vae.data import ImageBatches
from vae.ema import EMA
from vae.errors import UserError
from vae.losses import VAELoss
from vae.optim import gradient_clip

__all__ = ["NonFiniteLossError", "TRAIN_KEYS", "VAL_KEYS", "train_one_epoch", "validate"]

# Metric keys, defined once (flat, slash-separated; trackers log them as they are).
TRAIN_KEYS = ("train/loss", "train/recon", "train/kl", "train/tc")
VAL_KEYS = ("val/loss", "val/nelbo", "val/recon", "val/kl")


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step and remedies."""


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
                    forward=None) -> dict[str, Any]:
    """Train over the batches of ``batches.epoch`` from ``start_batch`` on.

    Sums stay on the device; the host reads them once every ``log_every`` steps (progress and
    the NaN check), so the loop never waits on the device in between.

    Args:
        forward: x -> (recon, mu, log_var, z), default ``model.forward_with_z`` (or a compiled one).
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
    # bf16 autocast: on CUDA, and on CPUs with bf16 units (AMX / AVX512-BF16); opt-in. Whether it pays
    # depends on the model and the CPU: the default model trained faster in float32 on Zen 5, the
    # benchmark preset 1.43x faster in bf16 on an Intel Xeon with AMX (BENCHMARKS.md, "Likelihood").
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp and device.type in ("cuda", "cpu") \
        else nullcontext()
    k = start_batch
    for k, (x, _) in enumerate(batches.iter_from(start_batch), start=start_batch):
        with autocast:
            terms = _loss_terms(loss_fn, forward, x)
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
