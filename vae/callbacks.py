"""How code outside the trainer observes and stops it: the :class:`Callback` hooks, and signals.

Trackers and tuners subclass :class:`Callback` (``tracking.MLflowCallback``, the sweep's pruning
callback); :func:`stop_on_signals` turns SIGINT/SIGTERM into the same clean stop, through
:func:`on_signals` (which the pipelines use too).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

Trainer = Any  # a vae.train.VAETrainer (which imports this module, so it is not imported here)

__all__ = ["Callback", "on_signals", "stop_on_signals"]


class Callback:
    """Hooks for code outside the library (trackers, tuners). Override what you need.

    A callback stops training by calling ``trainer.request_stop(reason)``: the trainer finishes
    the current step, saves ``last.pth`` and returns. Exceptions raised in a hook propagate.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None: ...

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None: ...


@contextmanager
def on_signals(handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM call ``handler(signal)``; the previous handlers come
    back after it. Only the main thread gets signals, so elsewhere (a Prefect task thread) this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _frame: handler(signal.Signals(signum)))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_on_signals(trainer: Trainer) -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGINT/SIGTERM call ``trainer.request_stop``: the trainer finishes the
    step, saves and returns. A second Ctrl-C interrupts at once (main thread only: :func:`on_signals`)."""

    def handler(sig: signal.Signals) -> None:
        if trainer.stop_reason is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(sig.name)

    return on_signals(handler)
