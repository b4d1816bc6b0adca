"""The search space and options: grammar, defaults, and checks that fail before any work."""

from __future__ import annotations

import optuna
import pytest

from tuning.options import SweepOptions, make_options
from tuning.space import ParamSpec, SpaceError, default_space, parse_spec, suggest


def test_default_space_is_beta_latent_dim_and_learning_rate():
    space = default_space()
    assert space["beta"] == ParamSpec("float", low=0.1, high=10.0, log=True)
    assert space["latent_dim"].choices == (8, 16, 32, 64, 128)
    assert space["learning_rate"] == ParamSpec("float", low=1e-4, high=3e-3, log=True)


def test_beta_means_beta_end_for_annealed_losses():
    assert "beta_end" in default_space("beta_vae") and "beta" not in default_space("beta_vae")


@pytest.mark.parametrize("text, spec", [
    ("log:1e-5:1e-3", ParamSpec("float", low=1e-5, high=1e-3, log=True)),
    ("float:0:0.5", ParamSpec("float", low=0.0, high=0.5)),
    ("int:32:256", ParamSpec("int", low=32.0, high=256.0)),
    ('choice:"mse"|"bce"', ParamSpec("categorical", choices=("mse", "bce"))),
])
def test_spec_grammar(text, spec):
    assert parse_spec("k", text) == spec


@pytest.mark.parametrize("text", ["log:0:1", "float:2:1", "int:1.5:3", "uniform:1:2", "choice:", "log:1"])
def test_bad_specs_are_refused(text):
    with pytest.raises(SpaceError):
        parse_spec("k", text)


def test_list_valued_choices_reach_the_config_as_lists():
    spec = parse_spec("hidden_dims", "choice:[16,32]|[32,64,128]")
    trial = optuna.create_study().ask()
    value = suggest(trial, {"hidden_dims": spec})["hidden_dims"]
    assert value in ([16, 32], [32, 64, 128])


def test_options_round_trip_through_json(optuna_dir):
    opts = make_options(search={"hidden_dims": "choice:[8]|[8,16]", "weight_decay": "log:1e-6:1e-3"})
    assert SweepOptions.from_json(opts.to_json()) == opts


def test_a_fixed_key_leaves_the_default_space(tiny_options):
    opts = tiny_options(fixed={"latent_dim": 4}, latent_dims=None)
    assert "latent_dim" not in opts.space and opts.base_config["latent_dim"] == 4


@pytest.mark.parametrize("kwargs, words", [
    ({"fixed": {"latnt_dim": 4}}, "did you mean 'latent_dim'"),
    ({"fixed": {"num_epochs": "three"}}, "num_epochs: must be an integer"),
    ({"lr_range": [1e-3, 20.0]}, "learning_rate: must be <= 10.0"),
    ({"beta_range": [0.0, 1.0]}, "LOW > 0"),
    ({"latent_dims": [0, 8]}, "latent_dim: must be >= 1"),
    ({"search": {"nope": "log:1:2"}}, "nope: unknown key"),
    ({"fixed": {"learning_rate": 1e-3}, "lr_range": [1e-4, 1e-3]}, "both fixed"),
    ({"multi_objective": True, "pruner": "median"}, "cannot prune multi-objective"),
    ({"storage": "not a url"}, "not a database URL"),
    ({"storage": "nosuchdb://x/y"}, "unknown database driver"),
    ({"storage": "sqlite:///:memory:"}, "in-memory"),
    ({"n_workers": 5, "n_trials": 2}, "more workers than trials"),
])
def test_bad_options_fail_with_one_line(tiny_options, kwargs, words):
    with pytest.raises(SpaceError) as err:  # SweepError is a SpaceError
        tiny_options(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_iw_objective_asks_the_trainer_for_the_bound(tiny_options):
    opts = tiny_options(objective="iw", iw_k=3)
    assert opts.metric == "val/iw_nll_k3" and opts.base_config["val_iw_k"] == 3


def test_make_options_defaults_match_the_issue():
    opts = make_options()
    assert (opts.sampler, opts.pruner, opts.metric) == ("tpe", "median", "val/nelbo")
    assert opts.storage_url.startswith("sqlite:///") and opts.storage_url.endswith("optuna/studies.db")
    multi = make_options(multi_objective=True)
    assert (multi.sampler, multi.pruner, multi.metrics) == ("nsga2", "none", ("val/recon", "val/kl"))
