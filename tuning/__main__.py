"""Command line: ``python -m tuning`` (console script ``vae-tune``) runs or resumes a sweep.

    python -m tuning --n-trials 20 --study-name vae-sweep --set num_epochs=5
    python -m tuning --n-trials 20 --n-workers 2 --pruner hyperband --beta-range 0.5 4
    python -m tuning --study-name vae-sweep --show-best     # the best trial's config as JSON

The flags are the user-facing fields of :class:`tuning.options.SweepOptions` (generated from
them), plus ``--show-best``. Bad input (unknown key, bad range, bad storage URL, missing data)
exits with code 2 and one line before any trial starts; an interrupted sweep exits 130 and
resumes when run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuning.options import SweepOptions, make_options
from tuning.space import SpaceError
from tuning.study import best_config
from tuning.sweep import run_sweep
from vae.cli import add_dataclass_arguments, given_arguments
from vae.errors import UserError

__all__ = ["build_parser", "parse_options", "main", "cli"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's own code)
        self.exit(2, f"error: {message} (see python -m tuning --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The sweep CLI's parser: a flag per user-facing :class:`SweepOptions` field, and ``--show-best``."""
    p = _Parser(prog="python -m tuning", description="Optuna sweep of the VAE (β, latent dim, lr).")
    add_dataclass_arguments(p, SweepOptions, dashes=True)
    p.add_argument("--show-best", action="store_true", help="print the study's best config as JSON and exit")
    return p


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpaceError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(argv=None) -> tuple[SweepOptions, argparse.Namespace]:
    """Parse and check the command line into :class:`tuning.options.SweepOptions`."""
    args = build_parser().parse_args(argv)
    given = given_arguments(args, SweepOptions)
    if "search" in given:
        given["search"] = _pairs(given["search"], "--search")
    if "fixed" in given:
        given["fixed"] = {k: _value(v) for k, v in _pairs(given["fixed"], "--set").items()}
    return make_options(**given), args


def main(argv=None) -> int:
    try:
        opts, args = parse_options(argv)
        if args.show_best:
            print(json.dumps(best_config(opts.study_name, opts.storage_url), indent=2))
            return 0
        summary = run_sweep(opts)
    except UserError as e:  # bad options, config, data, tracking server: one line
        print("error: " + " ".join(e.message().split()), file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def cli(argv=None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
