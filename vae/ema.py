"""An exponential moving average of a model's weights, used for evaluation and samples."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    shadow ← decay·shadow + (1 − decay)·value after each step, for parameters and floating-point
    buffers alike (BatchNorm running statistics must describe the averaged weights, not the live
    ones: copying the live statistics onto averaged weights made validation loss jump between
    epochs); integer buffers (``num_batches_tracked``) are copied. Early on the decay is
    min(decay, (1 + n) / (10 + n)) after n updates, as in TensorFlow's ExponentialMovingAverage,
    so the average is not dominated by the initial weights. ``module`` is the averaged model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_f, model_f = list(self.module.parameters()), list(model.parameters())
        ema_i, model_i = [], []
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            (ema_f if b.is_floating_point() else ema_i).append(b_ema)
            (model_f if b.is_floating_point() else model_i).append(b)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        if ema_i:  # _foreach_copy_ rejects an empty list (a model without BatchNorm has no buffers)
            torch._foreach_copy_(ema_i, model_i)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])
