"""Progress for long library work outside the training loop (evaluation stages, sweeps' trials).

Minutes of silence read as a hang: :class:`Progress` prints one line as each stage starts and
ends (with its time) and wraps long loops in a tqdm bar (rate and ETA). It is on when its stream
is a terminal, off otherwise (logs, pipes, CI) or when asked (``progress=False``, the config's
``progress: false``, ``--no_progress``); ``progress=True`` forces it on.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "format_seconds", "is_terminal", "terminal_size"]

T = TypeVar("T")


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (not a file, pipe or captured output)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def terminal_size() -> dict[str, int]:
    """tqdm's ``ncols``/``nrows``: tqdm hides a bar on a terminal that reports 0 rows (a pty without a
    size, e.g. under `script` or an IDE); shutil's size falls back to 80 x 24 there."""
    size = shutil.get_terminal_size()
    return {"ncols": size.columns, "nrows": size.lines}


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: durations and ETAs a reader takes in at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Stage lines and loop bars, or nothing.

    Args:
        enabled: True (on), False (off) or None (on when ``stream`` is a terminal).
        stream: where the lines and bars go (default ``sys.stderr``: stdout stays the results).
        prefix: the start of every line (``evaluate``).
    """

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None, prefix: str = "evaluate"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else bool(enabled)
        self.prefix = prefix
        self._t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"{self.prefix}: {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """``name ...`` now, ``name: done in 12 s (total 40 s)`` when the block ends (the total since
        this object was made, once earlier stages took time)."""
        start = time.perf_counter()
        self.line(f"{name} ...")
        yield
        now = time.perf_counter()
        total = f" (total {format_seconds(now - self._t0)})" if start - self._t0 >= 1 else ""
        self.line(f"{name}: done in {format_seconds(now - start)}{total}")

    def track(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        """``items`` with a bar (count, rate, ETA) when on; ``items`` itself when off."""
        if not self.enabled:
            return items
        return tqdm(items, desc=f"{self.prefix}: {desc}", total=total, file=self.stream, leave=False,
                    mininterval=0.5, **terminal_size())

    @contextmanager
    def counter(self, desc: str, total: int, unit: str = "it") -> Iterator[Callable[[int], object] | None]:
        """A bar over ``total`` units, advanced by the callable it yields (``None`` when off): for
        work that reports its own steps, such as the IW bound's decoder passes."""
        if not self.enabled:
            yield None
            return
        with tqdm(total=total, desc=f"{self.prefix}: {desc}", unit=unit, unit_scale=True, file=self.stream,
                  leave=False, mininterval=0.5, **terminal_size()) as bar:
            yield bar.update
