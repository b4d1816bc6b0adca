"""vae.config: presets, validation into frozen typed sections, CLI flags generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from vae.config import (PRESETS, Config, ConfigError, add_config_arguments, config_from_args, flatten_params,
                        get_beta_vae_config, get_default_config, get_disentangled_config, validate_config)

SEED_KEYS = {"in_channels", "hidden_dims", "latent_dim", "image_size", "beta", "batch_size", "num_epochs",
             "learning_rate", "weight_decay", "max_grad_norm", "loss_type", "reconstruction_loss_type",
             "beta_start", "beta_end", "beta_steps"}
EXTRA_KEYS = {"experiment_name", "data_dir", "seed", "ema_decay", "sample_every"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_every_seed_key_and_validates(preset):
    cfg = PRESETS[preset]()
    assert SEED_KEYS | EXTRA_KEYS <= set(cfg)
    validate_config(cfg)


def test_default_preset_has_the_seed_defaults(monkeypatch):
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    cfg = get_default_config()
    assert {k: cfg[k] for k in SEED_KEYS} == {
        "in_channels": 1, "hidden_dims": [32, 64, 128, 256], "latent_dim": 128, "image_size": 28, "beta": 1.0,
        "batch_size": 128, "num_epochs": 100, "learning_rate": 1e-3, "weight_decay": 1e-4, "max_grad_norm": 1.0,
        "loss_type": "vae", "reconstruction_loss_type": "mse", "beta_start": 0.0, "beta_end": 1.0,
        "beta_steps": 1000}
    assert cfg["data_dir"] == "./data"


def test_presets_are_fresh_dicts_each_call():
    a = get_default_config()
    a["hidden_dims"].append(512)
    a["num_epochs"] = 1
    assert get_default_config()["hidden_dims"] == [32, 64, 128, 256]
    assert get_default_config()["num_epochs"] == 100


def test_beta_and_disentangled_presets_pick_their_losses():
    assert get_beta_vae_config()["loss_type"] == "beta_vae"
    assert get_disentangled_config()["loss_type"] == "disentangled"


def test_unknown_key_is_rejected_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"laten_dim: unknown key \(did you mean 'latent_dim'\?\)"):
        validate_config({**get_default_config(), "laten_dim": 8})


@pytest.mark.parametrize("key, value, words", [
    ("latent_dim", "8", "an integer"),
    ("latent_dim", 8.0, "an integer"),
    ("latent_dim", True, "an integer"),
    ("learning_rate", "1e-3", "a number"),
    ("hidden_dims", [8, "16"], "a list of integers"),
    ("loss_type", "tc_vae", "one of 'vae', 'beta_vae', 'disentangled'"),
    ("amp", "yes", "true or false"),
    ("experiment_name", 3, "a string"),
])
def test_wrong_type_is_rejected_naming_the_field(key, value, words):
    with pytest.raises(ConfigError) as info:
        validate_config({key: value})
    assert info.value.problems == [f"{key}: must be {words}, got {value!r}"]


@pytest.mark.parametrize("key, value, bound", [
    ("batch_size", 0, ">= 1"),
    ("learning_rate", 0.0, "> 0.0"),
    ("ema_decay", 1.0, "< 1.0"),
    ("beta", -0.5, ">= 0.0"),
    ("hidden_dims", [8, 0], "every entry must be >= 1"),
])
def test_out_of_range_value_is_rejected_naming_the_field(key, value, bound):
    with pytest.raises(ConfigError) as info:
        validate_config({key: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{key}: ") and bound in info.value.problems[0]


def test_nan_is_rejected():
    with pytest.raises(ConfigError, match="weight_decay"):
        validate_config({"weight_decay": float("nan")})


def test_one_error_names_every_bad_field():
    with pytest.raises(ConfigError) as info:
        validate_config({"latent_dim": 0, "batch_size": "big", "lerning_rate": 1e-3, "loss_type": "x"})
    named = {p.split(":")[0] for p in info.value.problems}
    assert named == {"latent_dim", "batch_size", "lerning_rate", "loss_type"}
    for field in named:
        assert field in str(info.value)


def test_cross_field_problem_is_named():
    with pytest.raises(ConfigError, match="image_size: mnist images are 28x28"):
        validate_config({"image_size": 32})


def test_config_is_frozen():
    cfg = validate_config(get_default_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.latent_dim = 3  # type: ignore[misc]


def test_to_dict_round_trips():
    cfg = validate_config({**get_disentangled_config(), "hidden_dims": [8, 16], "seed": 7})
    flat = cfg.to_dict()
    assert flat["hidden_dims"] == [8, 16]
    assert validate_config(flat) == cfg
    assert set(flat) == set(get_default_config())


def test_validated_values_are_typed():
    cfg = validate_config({"hidden_dims": [8, 16], "learning_rate": 1})
    assert cfg.model.hidden_dims == (8, 16)
    assert isinstance(cfg.train.learning_rate, float)


def test_replace_validates_the_new_value():
    cfg = validate_config({})
    assert cfg.replace(latent_dim=8).model.latent_dim == 8
    with pytest.raises(ConfigError, match="latent_dim"):
        cfg.replace(latent_dim=-1)


def test_flatten_params_names_every_key_by_section():
    params = flatten_params(validate_config({}))
    assert {k.split(".", 1)[1] for k in params} == set(get_default_config())
    assert params["model.latent_dim"] == 128 and params["loss.beta_end"] == 1.0


def test_cli_has_a_flag_for_every_key():
    parser = add_config_arguments(argparse.ArgumentParser())
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {f"--{k}" for k in get_default_config()} <= flags


def test_cli_flags_override_the_preset_and_nothing_else():
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--hidden_dims", "8", "16", "--learning_rate", "1e-4", "--amp", "true"])
    cfg = config_from_args(args, get_beta_vae_config())
    assert cfg.model.hidden_dims == (8, 16)
    assert cfg.train.learning_rate == 1e-4
    assert cfg.run.amp is True
    assert cfg.loss.loss_type == "beta_vae" and cfg.loss.beta_end == 4.0


def test_vae_data_dir_sets_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path))
    assert get_default_config()["data_dir"] == str(tmp_path)
    assert validate_config(get_beta_vae_config()).data.data_dir == str(tmp_path)


def test_presets_do_not_read_vae_fast_dev_run(monkeypatch):
    monkeypatch.setenv("VAE_FAST_DEV_RUN", "3")
    assert all(preset()["fast_dev_run"] == 0 for preset in PRESETS.values())


def test_non_mapping_is_rejected():
    with pytest.raises(ConfigError, match="must be a mapping"):
        validate_config([("latent_dim", 8)])  # type: ignore[arg-type]


def test_a_validated_config_passes_through():
    cfg = validate_config({})
    assert validate_config(cfg) is cfg and isinstance(cfg, Config)
