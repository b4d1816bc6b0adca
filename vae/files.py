"""Files written so that a crash never leaves half of one: the one atomic-write helper, and a lock.

:func:`atomic_write` writes into a temporary file beside the target (``.<name>.<random>.tmp``),
flushes and fsyncs it, renames it over the target and fsyncs the folder, so a reader sees the old
file or the new one, never a torn one, and the rename survives a power cut. A writer killed
part-way leaves only its temporary file, which readers never open.

A write that fails because of the disk itself (full, read-only, not permitted, over a size
limit) raises :class:`StorageError`: one line naming the file and the free space, since no retry
can fix it. ``torch.save`` reports such a failure as a ``RuntimeError`` (``[enforce fail at
inline_container.cc:672] . unexpected pos ...``) whose context holds the ``OSError``, or whose
message holds the OS's words; :func:`storage_fault` recognises every form.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from vae.errors import UserError

__all__ = ["StorageError", "atomic_write", "exclusive_file_lock", "free_space", "storage_fault", "write_atomic", "storage_error"]

# errno -> the OS's words for it, as they appear inside torch's RuntimeError.
STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                  errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
                  errno.EPERM: "Operation not permitted", errno.EFBIG: "File too large",
                  errno.ENOTDIR: "Not a directory"}


class StorageError(UserError, OSError):
    """A file cannot be written because of the disk (full, read-only, not permitted): a retry cannot help.

    ``StorageError(errno, message)``; its text is the message alone (no ``[Errno N]`` prefix).
    """

    def __str__(self) -> str:
        return str(self.strerror)


def storage_fault(exc: BaseException) -> int | None:
    """The errno of a disk fault that ``exc`` is or wraps (its cause chain, or the OS's words in a
    ``RuntimeError``'s message), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return exc.errno or errno.EIO
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc.errno
        if isinstance(exc, RuntimeError):
            found = [code for code, words in STORAGE_ERRNOS.items() if words in str(exc)]
            if found:
                return found[0]
        exc = exc.__cause__ or exc.__context__
    return None


def free_space(path: str | Path) -> str:
    """Free space on the file system holding ``path`` (its nearest existing folder), e.g. ``12.3 MB free``."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free on {folder}"


def storage_error(exc: BaseException, path: str | Path) -> StorageError | None:
    """A :class:`StorageError` naming ``path`` and the free space for a disk fault ``exc`` is or
    wraps; None for anything else (and for an ``exc`` that already is one)."""
    code = storage_fault(exc)
    if code is None or isinstance(exc, StorageError):
        return None
    err = StorageError(code, f"cannot write {path}: {STORAGE_ERRNOS.get(code, os.strerror(code))} "
                             f"({free_space(path)})")
    err.filename = str(path)
    return err


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file to write; on a clean exit it replaces ``path`` durably.

    Args:
        path: the file to (re)place; its folder is created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).
    Yields:
        The open temporary file. If the block raises, it is removed and ``path`` is untouched.
    Raises:
        StorageError: the disk refused the write (full, read-only, not permitted, ...).
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        fault = storage_error(e, path)  # the free space as the write failed, before the partial file goes
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if fault is not None:
            raise fault from e
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
