"""The base class of every error a user causes and can fix.

Each module raises its own subclass (``ConfigError`` in :mod:`vae.config`, ``DataError`` in
:mod:`vae.data`, ``CheckpointError`` in :mod:`vae.checkpoint`, ...) whose message names what is
wrong and how to fix it. Command lines catch :class:`UserError` alone (:func:`vae.cli.run_cli`)
and print that message instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user: a config, a data file, a checkpoint, a run folder, a server address."""

    def message(self) -> str:
        """What a command line prints after ``error:`` (default: the exception's text)."""
        return str(self)
