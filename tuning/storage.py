"""Optuna storages that ride out database blips, and say in one line what a retry cannot fix.

A study store is a service: PostgreSQL restarts, a network link drops, a connection pool holds
sockets the server has closed. :func:`open_storage` returns, for a SQLAlchemy URL, a
:class:`RetryingRDBStorage`: SQLAlchemy pings a pooled connection before using it
(``pool_pre_ping``), and every storage call the sweep makes is retried with backoff while the
error is transient (connection refused or lost, server starting up or shutting down, a locked
SQLite file), for up to ``retry_s`` seconds. Then, or at once for what waiting cannot fix (bad
credentials, a missing database, a file that is not a database), it raises
:class:`StorageError`, one line naming the store (password hidden) and the cause.

Heartbeats: each running trial records one every ``heartbeat_s``; a trial whose heartbeat is
older than ``grace_s`` (its worker was killed, its machine lost) is failed by the next worker
that starts a trial or checks the study, and queued again (``RetryHeartbeatStaleTrialCallback``).
A missed heartbeat during a blip is skipped, not fatal; keep ``grace_s`` above the blips you want
running trials to survive. A RUNNING trial that never recorded a heartbeat (its worker lost the
database right after creating it) counts as stale once this process has seen it silent that long.

A damaged SQLite file is refused before SQLAlchemy touches it (read-only check), so it is never
"repaired" into an empty store.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import exc as sa_exc
from sqlalchemy import text as sa_text

from tuning.options import redact
from vae.errors import UserError

__all__ = ["StorageError", "RetryingRDBStorage", "open_storage", "storage_error_in", "quiet_storage_failures",
           "HEARTBEAT_S", "GRACE_S", "RETRY_S"]

HEARTBEAT_S, GRACE_S, RETRY_S = 20, 60, 60.0
# Causes no wait can fix, by their driver's wording (PostgreSQL, SQLite).
_PERMANENT = ("authentication failed", "password", "does not exist", "no pg_hba.conf entry", "permission denied",
              "not a database", "malformed", "unable to open database file", "readonly database")
_TRANSIENT_TYPES = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, ConnectionError,
                    TimeoutError)


class StorageError(UserError):
    """The study store failed in a way the sweep cannot ride out; the message is one line.

    Not a ``ValueError``: the objective's ``catch`` must not turn it into a failed trial.
    """


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def storage_error_in(e: BaseException) -> StorageError | None:
    """The :class:`StorageError` behind ``e`` (Optuna may raise another error while handling it)."""
    return next((x for x in _chain(e) if isinstance(x, StorageError)), None)


def cause(e: BaseException) -> str:
    """The driver's own first line for ``e`` (under SQLAlchemy's and Optuna's wrappers)."""
    inner = [x for x in _chain(e) if not isinstance(x, (optuna.exceptions.StorageInternalError,))]
    for x in inner:
        orig = getattr(x, "orig", None)
        if orig is not None:
            x = orig
        text = " ".join(str(x).split("\n")[0].split())
        if text:
            return text
    return type(e).__name__


def is_transient(e: BaseException) -> bool:
    """A connection-level error that may go away by itself (and nothing that will not)."""
    if isinstance(e, StorageError):
        return False
    for x in _chain(e):
        if isinstance(x, sa_exc.DBAPIError) and x.connection_invalidated:
            return True
        if isinstance(x, _TRANSIENT_TYPES):
            return not any(word in str(x).lower() for word in _PERMANENT)
    return False


class _DropStorageFailures(logging.Filter):
    """Drops Optuna's "Trial N failed ... because of StorageError" warning (with its traceback) and
    the "failed with value None" line after it: the sweep prints the one-line error instead."""

    def __init__(self):
        super().__init__()
        self.dropped_last = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and storage_error_in(record.exc_info[1]):
            self.dropped_last = True
            return False
        drop = self.dropped_last and "failed with value None" in record.getMessage()
        self.dropped_last = False
        return not drop


def quiet_storage_failures() -> None:
    """Install :class:`_DropStorageFailures` on Optuna's optimize-loop logger (once)."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _DropStorageFailures) for f in logger.filters):
        logger.addFilter(_DropStorageFailures())


class Retrier:
    """Calls a function again while it fails transiently, backing off 0.2 s .. 5 s, for ``retry_s``."""

    def __init__(self, url: str, retry_s: float):
        self.url, self.retry_s = url, retry_s

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start, delay, tries = time.monotonic(), 0.2, 0
        while True:
            tries += 1
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - sorted into transient (wait) and the rest (one line)
                if not is_transient(e):
                    if storage_error_in(e) or not _from_database(e):
                        raise
                    raise self.error(e) from None
                waited = time.monotonic() - start
                if waited + delay > self.retry_s:
                    raise self.error(e, f"gave up after {tries} tries in {waited:.0f} s (is the database "
                                        f"server up?); the study is kept: run the same command again") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def error(self, e: BaseException, advice: str = "") -> StorageError:
        return StorageError(f"optuna storage {redact(self.url)}: {cause(e)}" + (f"; {advice}" if advice else ""))


def _from_database(e: BaseException) -> bool:
    """Raised by the database layer itself (Optuna's own errors, e.g. DuplicatedStudyError, pass through)."""
    return isinstance(e, (sa_exc.SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError))


class RetryingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls retry transient database errors (see the module docstring)."""

    retrier: Retrier
    _first_silent: dict[int, float]  # trial id -> when this process first saw it RUNNING and never beaten

    def record_heartbeat(self, trial_id: int) -> None:
        """One try: a beat missed in a blip is skipped (the next comes ``heartbeat_s`` later)."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001
            if not is_transient(e):
                raise

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials, plus RUNNING trials that never recorded a heartbeat (their worker
        lost the database, or died, before the first beat) once this process has seen them silent
        for the grace period: Optuna skips those, and they would stay RUNNING for ever."""
        stale = self.retrier(super()._get_stale_trial_ids, study_id)
        now, grace = time.monotonic(), self.grace_period or 2 * (self.heartbeat_interval or 1)
        silent = self.retrier(self._never_beaten, study_id)
        self._first_silent = {t: self._first_silent.get(t, now) for t in silent}
        return stale + [t for t, seen in self._first_silent.items() if now - seen > grace and t not in stale]

    def _never_beaten(self, study_id: int) -> list[int]:
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(_NEVER_BEATEN, {"study_id": study_id})]

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        """Retried; a retry that finds the trial already in ``state`` means the lost reply had committed."""
        try:
            return self.retrier(super().set_trial_state_values, trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            if self.get_trial(trial_id).state == state and state.is_finished():
                return True
            raise


# Every call of the storage API the sweep, Optuna's optimize loop and its cache make.
_RETRIED = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
            "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
            "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
            "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
            "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
            "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
            "get_best_trial", "_get_best_trial_id")
_NEVER_BEATEN = sa_text("SELECT t.trial_id FROM trials t WHERE t.study_id = :study_id AND t.state = 'RUNNING' "
                        "AND NOT EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)")


def _retried(name: str):
    base = getattr(RDBStorage, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        return self.retrier(base, self, *args, **kwargs)

    return method


for _name in _RETRIED:
    setattr(RetryingRDBStorage, _name, _retried(_name))


def open_storage(url: str, *, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S,
                 retry_s: float = RETRY_S) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL that :func:`tuning.options.check_storage` accepted.

    Raises:
        StorageError: the store cannot be opened (at once if waiting cannot help, else after ``retry_s``).
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    retrier = Retrier(url, retry_s)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        _check_sqlite_file(path, retrier)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers wait for each other's writes
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}  # a silent server is a blip too, not a hang

    def make() -> RetryingRDBStorage:
        with warnings.catch_warnings():  # the heartbeat API is marked experimental; it is what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RetryingRDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))

    storage = retrier(make)  # __init__ creates the tables: the first contact, retried as a whole
    storage.retrier, storage._first_silent = retrier, {}
    return storage


def _check_sqlite_file(path: Path, retrier: Retrier) -> None:
    """Refuse (read-only, before SQLAlchemy opens it) an existing file that is not a sound SQLite database."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    problem = None
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            problem = "not an SQLite database"
    if problem is None:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60) as con:
                row = con.execute("PRAGMA quick_check").fetchone()
            if row and row[0] != "ok":
                problem = f"a damaged SQLite database ({row[0]})"
        except sqlite3.DatabaseError as e:
            problem = f"a damaged SQLite database ({e})"
    if problem:
        raise StorageError(f"optuna storage {redact(retrier.url)}: {path} is {problem}; it was left unchanged: "
                           f"restore it from a backup, or move it aside (mv {path} {path}.damaged) to start "
                           f"a new store, or pass another --storage")
