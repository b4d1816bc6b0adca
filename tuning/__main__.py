"""Command line: ``python -m tuning`` (console script ``vae-tune``) runs or resumes a sweep.

    python -m tuning --n-trials 20 --study-name vae-sweep --set num_epochs=5
    python -m tuning --n-trials 20 --n-workers 2 --pruner hyperband --beta-range 0.5 4
    python -m tuning --study-name vae-sweep --show-best     # the best trial's config as JSON

Bad input (unknown key, bad range, bad storage URL, missing data) exits with code 2 and one
line before any trial starts; an interrupted sweep exits 130 and resumes when run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuning.options import OBJECTIVES, PRUNERS, SAMPLERS, make_options
from tuning.space import DEFAULT_BETA_RANGE, DEFAULT_LATENT_DIMS, DEFAULT_LR_RANGE, SpaceError
from vae.config import PRESETS, ConfigError

__all__ = ["build_parser", "parse_options", "main", "cli"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's own code)
        self.exit(2, f"error: {message} (see python -m tuning --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The sweep CLI's parser (the flow's parameters mirror these options)."""
    p = _Parser(prog="python -m tuning", description="Optuna sweep of the VAE (β, latent dim, lr).")
    a = p.add_argument
    a("--study-name", default="vae-sweep", help="Optuna study (and default MLflow experiment) name")
    a("--storage", default=None, help="SQLAlchemy URL or journal:PATH (default $VAE_OPTUNA_STORAGE, else sqlite:///optuna/studies.db)")
    a("--n-trials", type=int, default=20, help="trials to add to the study in this run (default 20)")
    a("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    a("--n-workers", type=int, default=1, help="worker processes on the study (default 1)")
    a("--threads", type=int, default=None, help="torch threads per worker (default cores / workers)")
    a("--seed", type=int, default=0, help="sampler seed (worker i uses seed + i; default 0)")
    a("--sampler", choices=SAMPLERS, default=None, help="default tpe (nsga2 with --multi-objective)")
    a("--pruner", choices=PRUNERS, default=None, help="default median (none with --multi-objective)")
    a("--pruner-startup-trials", type=int, default=5, help="median pruner: trials before pruning starts")
    a("--pruner-warmup-epochs", type=int, default=0, help="median pruner: epochs before a trial can be pruned")
    a("--objective", choices=OBJECTIVES, default="nelbo", help="val NELBO at β=1 (default) or IW bound")
    a("--iw-k", type=int, default=5, help="importance samples of the iw objective (default 5)")
    a("--multi-objective", action="store_true", help="minimise (val/recon, val/kl) with NSGA-II")
    a("--population-size", type=int, default=20, help="NSGA-II population (default 20)")
    a("--preset", choices=sorted(PRESETS), default="small", help="base config of every trial (default small)")
    a("--beta-range", type=float, nargs=2, metavar=("LO", "HI"), help=f"β, log-uniform (default {DEFAULT_BETA_RANGE})")
    a("--latent-dims", type=int, nargs="+", metavar="N", help=f"latent dims (default {DEFAULT_LATENT_DIMS})")
    a("--lr-range", type=float, nargs=2, metavar=("LO", "HI"), help=f"learning rate, log-uniform (default {DEFAULT_LR_RANGE})")
    a("--search", action="append", default=[], metavar="KEY=SPEC",
      help="search another config key: log:LO:HI, float:LO:HI, int:LO:HI or choice:A|B|C")
    a("--set", "--param", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
      help="fix a config key for every trial (value as JSON, else text), e.g. --set num_epochs=3")
    a("--experiment-name", default=None, help="MLflow experiment (default: the study name)")
    a("--no-plots", dest="plots", action="store_false", help="skip the study's figures at the end")
    a("--show-best", action="store_true", help="print the study's best config as JSON and exit")
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


def parse_options(argv=None):
    """Parse and check the command line into :class:`tuning.options.SweepOptions`."""
    args = build_parser().parse_args(argv)
    fixed = {k: _value(v) for k, v in _pairs(args.fixed, "--set").items()}
    opts = make_options(
        study_name=args.study_name, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout,
        n_workers=args.n_workers, seed=args.seed, sampler=args.sampler, pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials, pruner_warmup_epochs=args.pruner_warmup_epochs,
        objective=args.objective, iw_k=args.iw_k, multi_objective=args.multi_objective,
        population_size=args.population_size, preset=args.preset, beta_range=args.beta_range,
        latent_dims=args.latent_dims, lr_range=args.lr_range, search=_pairs(args.search, "--search"),
        fixed=fixed, experiment_name=args.experiment_name, threads=args.threads,
        plots=args.plots)
    return opts, args


def main(argv=None) -> int:
    from tracking import TrackingUnavailableError
    from vae.data import DataError

    try:
        opts, args = parse_options(argv)
        if args.show_best:
            from tuning.study import best_config

            print(json.dumps(best_config(opts.study_name, opts.storage), indent=2))
            return 0
        from tuning.sweep import run_sweep

        summary = run_sweep(opts)
    except (SpaceError, ConfigError, DataError, TrackingUnavailableError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def cli(argv=None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
