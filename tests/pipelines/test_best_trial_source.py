"""Retraining from a sweep: the best trial's config of the newest (or a named) Optuna study."""

from __future__ import annotations

import json

import optuna
import pytest

from pipelines.retraining import best_trial_config, newest_study


@pytest.fixture
def studies(tmp_path, monkeypatch, tiny_config):
    """Two studies in a real SQLite storage; in each, trial config latent_dim 2 scores best."""
    monkeypatch.setenv("VAE_OPTUNA_DIR", str(tmp_path / "optuna"))
    from tuning.options import default_storage

    (tmp_path / "optuna").mkdir()
    for name in ("older", "newer"):
        study = optuna.create_study(study_name=name, storage=default_storage(), direction="minimize")
        for latent, value in ((2, 100.0), (8, 120.0)):
            study.add_trial(optuna.trial.create_trial(
                params={"latent_dim": latent}, distributions={"latent_dim": optuna.distributions.IntDistribution(2, 8)},
                value=value, user_attrs={"config": {**tiny_config, "latent_dim": latent, "experiment_name": name}}))
    return tmp_path / "optuna"


def test_newest_study_is_the_last_started(studies):
    assert newest_study() == "newer"


def test_best_trial_config_comes_from_the_study_storage(studies):
    config = best_trial_config(None)
    assert config["latent_dim"] == 2 and config["experiment_name"] == "newer-best"


def test_best_config_file_written_by_the_sweep_wins(studies, tiny_config):
    path = studies / "older" / "best_config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**tiny_config, "latent_dim": 3}))
    assert best_trial_config("older")["latent_dim"] == 3
