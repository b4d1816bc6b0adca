"""Files written so that a crash never leaves half of one: the one atomic-write helper, and a lock.

:func:`atomic_write` writes into a temporary file beside the target (``.<name>.<random>.tmp``),
flushes and fsyncs it, renames it over the target and fsyncs the folder, so a reader sees the old
file or the new one, never a torn one, and the rename survives a power cut. A writer killed
part-way leaves only its temporary file, which readers never open.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "write_atomic", "exclusive_file_lock"]


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file to write; on a clean exit it replaces ``path`` durably.

    Args:
        path: the file to (re)place; its folder is created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).
    Yields:
        The open temporary file. If the block raises, it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` with :func:`atomic_write`; returns the path."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive_file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block: how
    processes started at once on a new SQLite database take turns creating its schema."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
