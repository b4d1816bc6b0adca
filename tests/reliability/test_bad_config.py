"""Bad configurations are refused before any work, naming every bad field, exit code 2, no traceback."""

from __future__ import annotations

import pytest

# Imported while collecting, as tests/pipelines does: Prefect binds its log handler to the
# stderr of the moment, which must not be a capsys stream that closes after one test.
import pipelines.training  # noqa: F401
from tests.reliability.conftest import assert_one_line_error, call_cli, tally
from vae.config import ConfigError, get_default_config, validate_config

BAD_VALUES = [
    # (overrides, the field the message must name)
    ({"latent_dim": 0}, "latent_dim"),
    ({"latent_dim": -3}, "latent_dim"),
    ({"beta": -0.5}, "beta"),
    ({"beta_end": -1.0}, "beta_end"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"beta": float("inf")}, "beta"),
    ({"hidden_dims": []}, "hidden_dims"),
    ({"hidden_dims": [8, 0]}, "hidden_dims"),
    ({"hidden_dims": [4, 4, 4, 4, 4, 4]}, "hidden_dims"),  # 6 stride-2 stages cannot make 28x28
    ({"image_size": 20}, "image_size"),
    ({"image_size": 0}, "image_size"),
    ({"lattent_dim": 4}, "lattent_dim"),
    ({"batch_size": "64"}, "batch_size"),
    ({"num_epochs": 2.5}, "num_epochs"),
    ({"hidden_dims": [8, True]}, "hidden_dims"),
    ({"amp": "yes"}, "amp"),
    ({"loss_type": "gan"}, "loss_type"),
    ({"learning_rate": 10 ** 400}, "learning_rate"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"max_train_samples": 50, "val_size": 100}, "max_train_samples"),
]


@pytest.mark.parametrize("overrides, field", BAD_VALUES, ids=[f"{f}={list(o.values())[0]!r:.12}" for o, f in BAD_VALUES])
def test_validate_config_names_the_bad_field(overrides, field):
    tally("bad_inputs")
    with pytest.raises(ConfigError) as err:
        validate_config({**get_default_config(), **overrides})
    assert any(p.startswith(f"{field}:") for p in err.value.problems), err.value.problems


def test_validate_config_names_every_bad_field_at_once():
    bad = {"latent_dim": 0, "beta": -1.0, "learning_rate": 0.0, "batch_size": "8", "colour": "red"}
    tally("bad_inputs")
    with pytest.raises(ConfigError) as err:
        validate_config({**get_default_config(), **bad})
    named = {p.split(":", 1)[0] for p in err.value.problems}
    assert named == set(bad)


def test_train_cli_names_every_bad_flag_and_starts_nothing(procs, tmp_path, tiny_data_dir):
    ck = tmp_path / "ck"
    flags = ["--data_dir", str(tiny_data_dir), "--checkpoint_dir", str(ck),
             "--latent_dim", "0", "--beta", "-1", "--learning_rate", "0", "--image_size", "20",
             "--batch_size", "eight", "--loss_type", "gan", "--amp", "maybe"]
    tally("bad_inputs")
    res = procs.python("-m", "vae.train", *flags)
    assert res.returncode == 2, res
    assert_one_line_error(res.stderr, "latent_dim", "beta", "learning_rate", "image_size", "batch_size",
                          "loss_type", "amp")
    assert not ck.exists(), "a rejected configuration created a run folder"
    assert res.stdout == ""


def test_train_cli_unknown_flag_and_empty_list_exit_2(tmp_path, capsys):
    from vae.train import cli

    tally("bad_inputs", 2)
    code, _, err = call_cli(cli, ["--hidden_dims", "--checkpoint_dir", str(tmp_path / "ck")], capsys)
    assert code == 2 and "hidden_dims" in err.splitlines()[-1]
    code, _, err = call_cli(cli, ["--lattent_dim", "4", "--checkpoint_dir", str(tmp_path / "ck")], capsys)
    assert code == 2 and "--lattent_dim" in err.splitlines()[-1]
    assert not (tmp_path / "ck").exists()


def test_sample_cli_names_every_bad_option_before_loading(tmp_path, capsys):
    from vae.sample import cli

    tally("bad_inputs")
    code, _, err = call_cli(cli, ["--model_path", str(tmp_path / "nope.pth"), "--num_samples", "0", "--grid_size", "1",
                                  "--num_steps", "-2", "--latent_range_min", "3", "--latent_range_max", "-3",
                                  "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line_error(err, "num_samples", "grid_size", "num_steps", "latent_range_min")
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_names_every_bad_option_before_loading(tmp_path, capsys):
    from vae.evaluate import cli

    tally("bad_inputs")
    code, _, err = call_cli(cli, ["--model_path", str(tmp_path / "nope.pth"), "--k", "-1", "--num_samples", "1",
                                  "--max_test_images", "-5", "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line_error(err, "--k", "num_samples", "max_test_images")
    assert not (tmp_path / "out").exists()


def test_tuning_cli_rejects_bad_trial_config_before_creating_a_study(tmp_path, tiny_data_dir, capsys, monkeypatch):
    from tuning.__main__ import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAE_OPTUNA_DIR", raising=False)
    monkeypatch.delenv("VAE_MLRUNS_DIR", raising=False)
    tally("bad_inputs")
    code, _, err = call_cli(cli, ["--n-trials", "1", "--set", "batch_size=0", "--set", "weight_decay=-1",
                                  "--set", "lattent_dim=3", "--set", f"data_dir={tiny_data_dir}"], capsys)
    assert code == 2
    assert_one_line_error(err, "batch_size", "weight_decay", "lattent_dim")
    assert not (tmp_path / "optuna").exists() and not (tmp_path / "mlruns").exists(), list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, needle", [
    (["--n-trials", "0"], "n-trials"),
    (["--storage", "nonsense"], "storage"),
    (["--n-workers", "3", "--n-trials", "2"], "n-workers"),
    (["--beta-range", "2", "1"], "beta"),
    (["--lr-range", "-1", "1e-3"], "lr"),
])
def test_tuning_cli_rejects_bad_options_in_one_line(argv, needle, capsys):
    from tuning.__main__ import cli

    tally("bad_inputs")
    code, _, err = call_cli(cli, argv, capsys)
    assert code == 2
    assert_one_line_error(err, needle)


def test_pipeline_cli_names_every_bad_flag_before_any_run(tmp_path, capsys, monkeypatch):
    from pipelines.training import cli

    monkeypatch.setenv("VAE_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tally("bad_inputs")
    code, _, err = call_cli(cli, ["--latent_dim", "0", "--beta", "-2", "--learning_rate", "abc", "--hidden_dims", "8", "0",
                                  "--checkpoint_dir", str(tmp_path / "ck")], capsys)
    assert code == 2
    assert_one_line_error(err, "latent_dim", "beta", "learning_rate", "hidden_dims")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "ck").exists()
