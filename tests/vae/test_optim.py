"""vae.optim: weight-decay groups, per-step LR schedules, gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae.model import VAE
from vae.optim import create_lr_scheduler, create_optimizer, gradient_clip


def test_optimizer_does_not_decay_biases_and_norms():
    opt = create_optimizer(VAE(hidden_dims=[4], latent_dim=2), 1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim > 1 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def _lrs(kind, total, warmup=0):
    """The learning rate of steps 0..total (base rate 1)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_lr_scheduler(opt, kind, total, warmup)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_decays_from_1_to_1_percent():
    lrs = _lrs("cosine", 100)
    assert lrs[0] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.01)
    assert lrs[50] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_schedule_drops_tenfold_at_thirds():
    lrs = _lrs("step", 90)
    assert lrs[0] == lrs[29] == 1.0 and lrs[31] == lrs[59] == pytest.approx(0.1) and lrs[61] == pytest.approx(0.01)


def test_warm_up_is_linear():
    assert _lrs("constant", 10, warmup=4)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_gradient_clip_limits_the_norm_and_zero_disables():
    p = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.p = p
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert gradient_clip(model, 0) is None and float(p.grad.norm()) == 5.0
    assert float(gradient_clip(model, 1.0)) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0)
