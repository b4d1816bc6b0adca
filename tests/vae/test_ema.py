"""vae.ema.EMA: warm-up decay, float buffers averaged and integer ones copied, no training."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from vae.ema import EMA


def test_ema_follows_the_weights_with_warm_up_decay():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay = min(0.9, 2/11)
    assert float(ema.module.weight[0, 0]) == pytest.approx(1 - 2 / 11)


def test_ema_averages_float_buffers_and_copies_integer_ones():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    model.running_mean.fill_(5.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # first update: decay = min(0.9, 2/11), from running_mean 0
    torch.testing.assert_close(ema.module.running_mean, torch.full((3,), 5.0 * (1 - 2 / 11)))
    assert int(ema.module.num_batches_tracked) == 7


def test_ema_never_trains():
    ema = EMA(nn.BatchNorm1d(3), decay=0.99)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_works_for_a_model_without_buffers():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight)


def test_ema_state_dict_round_trips():
    model = nn.Linear(2, 2)
    a = EMA(model, 0.9)
    a.update(model)
    b = EMA(nn.Linear(2, 2), 0.5)
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.9 and b.num_updates == 1
    torch.testing.assert_close(b.module.weight, a.module.weight)
