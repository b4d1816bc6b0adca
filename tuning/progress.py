"""Progress of a sweep's trials while they train: a line when a trial starts and one per epoch.

A trial trains for minutes (the first one longest) with the trainer's own bars off, and the
study's line (:class:`tuning.study.ProgressPrinter`) comes only when it ends. :class:`TrialProgress`
is a trainer callback that fills the silence on stdout::

    trial   3 started | latent_dim=16 beta=1.42 learning_rate=0.00113
    trial   3 epoch 2/5 | val/nelbo 142.318 | 41 s, ETA 1 min 02 s

Shown when the sweep's stdout is a terminal or ``--progress`` asks for it; ``--no-progress``
turns it off (:func:`progress_wanted`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Mapping, TextIO

from vae.callbacks import Callback
from vae.progress import format_seconds, is_terminal

__all__ = ["TrialProgress", "progress_wanted"]


def progress_wanted(progress: bool | None, stream: TextIO | None = None) -> bool:
    """The sweep's ``progress`` option resolved: None means "when stdout is a terminal"."""
    return is_terminal(stream or sys.stdout) if progress is None else bool(progress)


class TrialProgress(Callback):
    """Prints a trial's start and each of its epochs: the objective metric, elapsed time, ETA.

    Args:
        number: the trial's number; params: its sampled values (shown on the start line).
        metric: the key of the epoch metrics to show (``val/nelbo``); num_epochs: the trial's total.
        prefix: before every line (``[w1] `` for worker 1); stream: default ``sys.stdout``.
    """

    def __init__(self, number: int, params: Mapping[str, Any], metric: str, num_epochs: int, prefix: str = "",
                 stream: TextIO | None = None):
        self.number, self.params, self.metric, self.num_epochs = number, dict(params), metric, num_epochs
        self.prefix, self.stream = prefix, stream
        self._t0 = time.perf_counter()

    def _print(self, text: str) -> None:
        print(f"{self.prefix}trial {self.number:>3} {text}", file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer) -> None:
        self._t0 = time.perf_counter()
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        self._print(f"started | {params}")

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self._t0
        value = metrics.get(self.metric, math.nan)
        left = max(0, self.num_epochs - epoch)
        eta = f", ETA {format_seconds(elapsed / epoch * left)}" if left and epoch > 0 else ""
        self._print(f"epoch {epoch}/{self.num_epochs} | {self.metric} {value:.3f} | {format_seconds(elapsed)}{eta}")
