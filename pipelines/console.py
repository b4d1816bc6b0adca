"""The terminal of a pipeline command: a user's mistake is one ``error:`` line, not a traceback.

Prefect logs every failed task and flow run on its console handler, traceback included ("Task
run failed with exception", "Encountered exception during execution", "Finished in state
Failed"), before the exception reaches :func:`vae.cli.run_cli`, which then prints its clean
``error: ...`` line. For a :class:`~vae.errors.UserError` (bad config, missing data, ...) those
records say nothing the line does not, in sixty lines; :func:`hide_user_error_tracebacks` drops
them from the console only. The Prefect API still receives them (the run's log in the UI), and
every other failure (a bug) keeps its traceback on the terminal. :func:`dumps` writes what a
command prints for machines as strict JSON (no ``NaN``).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler

from vae.errors import Interrupted, UserError

__all__ = ["UserErrorFilter", "dumps", "hide_user_error_tracebacks", "strict_json"]

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
QUIET = (UserError, Interrupted)  # failures the command line reports in one line of its own


def _user_error_names() -> set[str]:
    names, todo = set(), list(QUIET)
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class UserErrorFilter(logging.Filter):
    """Drops the task/flow-run records about a failure whose exception is a :class:`UserError` (or
    an :class:`~vae.errors.Interrupted`: work stopped on request, which the command line reports):
    those carrying it as ``exc_info``, and the "Finished in state Failed(... DataError: ...)" lines
    that name it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(RUN_LOGGERS):
            return True
        if record.exc_info and isinstance(record.exc_info[1], QUIET):
            return False
        message = record.getMessage()
        if message.startswith("Finished in state Failed"):
            return not any(f"{name}:" in message for name in _user_error_names())
        return True


def hide_user_error_tracebacks() -> None:
    """Add :class:`UserErrorFilter` to Prefect's console handlers (idempotent); the API handler
    that sends run logs to the Prefect server is left alone."""
    ensure_logging_setup()
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ("prefect", *RUN_LOGGERS))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        if not any(isinstance(f, UserErrorFilter) for f in handler.filters):
            handler.addFilter(UserErrorFilter())


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None, for ``json.dumps(allow_nan=False)``:
    Python's default would write ``NaN``, which is not JSON and which other tools refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON of ``value`` (non-finite floats as null), indented for a terminal."""
    return json.dumps(strict_json(value), indent=2, allow_nan=False)
