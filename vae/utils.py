"""The seed's grab-bag of helpers, kept importable: each now lives in a module of its own.

:mod:`vae.device` (``get_device``, ``set_seed``), :mod:`vae.optim` (optimiser, schedule,
clipping), :mod:`vae.ema` (``EMA``), :mod:`vae.checkpoint` (checkpoint I/O, ``load_model``).
"""

from vae.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint
from vae.device import get_device, set_seed
from vae.ema import EMA
from vae.optim import create_lr_scheduler, create_optimizer, gradient_clip, parameter_groups

__all__ = ["CHECKPOINT_FORMAT", "EMA", "CheckpointError", "create_lr_scheduler", "create_optimizer", "get_device",
           "gradient_clip", "load_checkpoint", "load_model", "parameter_groups", "save_checkpoint", "set_seed"]
