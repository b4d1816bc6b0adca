"""One list of sweep options: the CLI's flags, make_options' keywords and the vae-sweep flow's
parameters are all the user-facing fields of SweepOptions, with the same defaults."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from tuning.__main__ import build_parser, parse_options
from tuning.options import USER_FIELDS, SweepOptions, make_options

# Every flag the sweep CLI has had: renaming one breaks users' scripts.
FLAGS = {"--study-name", "--storage", "--n-trials", "--timeout", "--n-workers", "--threads", "--seed", "--sampler",
         "--pruner", "--pruner-startup-trials", "--pruner-warmup-epochs", "--objective", "--iw-k",
         "--multi-objective", "--population-size", "--preset", "--beta-range", "--latent-dims", "--lr-range",
         "--search", "--set", "--param", "--experiment-name", "--heartbeat-s", "--grace-s", "--storage-retry-s",
         "--no-plots", "--progress", "--no-progress", "--show-best"}


def _defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(SweepOptions) if f.name in USER_FIELDS}


def test_user_fields_are_those_with_help_and_derived_fields_have_none():
    derived = {f.name for f in dataclasses.fields(SweepOptions)} - set(USER_FIELDS)
    assert derived == {"storage_url", "space", "base_config", "trials_dir"}
    assert {"preset", "beta_range", "latent_dims", "lr_range", "search", "fixed"} <= set(USER_FIELDS)


def test_cli_flags_are_exactly_the_user_fields():
    actions = [a for a in build_parser()._actions if a.dest not in ("help", "show_best")]
    assert [a.dest for a in actions] == list(USER_FIELDS)
    assert {flag for a in build_parser()._actions for flag in a.option_strings} - {"-h", "--help"} == FLAGS


def test_make_options_takes_exactly_the_user_fields_with_their_defaults():
    params = inspect.signature(make_options).parameters
    assert {name: p.default for name, p in params.items()} == _defaults()
    with pytest.raises(TypeError, match="space"):
        make_options(space={})


def test_flow_parameters_are_the_user_fields_with_their_defaults():
    from tuning.flow import vae_sweep

    schema = vae_sweep.parameters
    assert list(schema.properties) == list(USER_FIELDS) and not schema.required
    defaults = {name: prop.get("default") for name, prop in schema.properties.items()}
    assert defaults == json.loads(json.dumps(_defaults()))
    assert schema.properties["preset"]["enum"] == ["benchmark", "beta_vae", "default", "disentangled", "small"]


def test_cli_and_keywords_build_the_same_options(optuna_dir):
    opts, _ = parse_options(["--n-trials", "3", "--beta-range", "0.5", "2", "--latent-dims", "2", "4",
                             "--search", "weight_decay=log:1e-6:1e-3", "--set", "num_epochs=1", "--param",
                             "batch_size=64", "--multi-objective", "--no-plots"])
    assert opts == make_options(n_trials=3, beta_range=(0.5, 2.0), latent_dims=[2, 4], multi_objective=True,
                                search={"weight_decay": "log:1e-6:1e-3"}, fixed={"num_epochs": 1, "batch_size": 64},
                                plots=False)
    assert (opts.sampler, opts.pruner, opts.experiment_name) == ("nsga2", "none", "vae-sweep")


def test_no_flags_give_the_dataclass_defaults(optuna_dir):
    opts, args = parse_options([])
    assert opts == make_options() and not args.show_best
    assert {k: getattr(opts, k) for k in ("study_name", "n_trials", "preset", "plots", "seed")} == \
        {"study_name": "vae-sweep", "n_trials": 20, "preset": "small", "plots": True, "seed": 0}
