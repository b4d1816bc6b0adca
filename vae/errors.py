"""The base classes of what a command line reports in one line instead of a traceback.

:class:`UserError`: every error a user causes and can fix. Each module raises its own subclass
(``ConfigError`` in :mod:`vae.config`, ``DataError`` in :mod:`vae.data`, ``CheckpointError`` in
:mod:`vae.checkpoint`, ...) whose message names what is wrong and how to fix it; command lines
(:func:`vae.cli.run_cli`) print ``error:`` and that message, exit code 2. :class:`Interrupted`:
work a user stopped (SIGTERM, Ctrl-C) after saving what it had; command lines print ``stopped:``
and its message, exit code 130.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user: a config, a data file, a checkpoint, a run folder, a server address."""

    def message(self) -> str:
        """What a command line prints after ``error:`` (default: the exception's text)."""
        return str(self)


class Interrupted(Exception):
    """Work stopped on request after saving its state; the message says how to continue it."""
