"""The registry on a real MLflow store: what a version holds, and that logging and loading from a
worker thread (as Prefect tasks do) never touches MLflow's process-wide URIs or the environment."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus

import tracking
from pipelines import registry
from vae.config import validate_config
from vae.train import VAETrainer


@pytest.fixture
def checkpoint(tiny_config) -> str:
    """A one-epoch tiny model's best checkpoint."""
    return VAETrainer(validate_config({**tiny_config, "num_epochs": 1}), []).train()["best_model_path"]


@pytest.fixture
def run_id(client) -> str:
    return client.create_run(tracking.ensure_experiment(client, "tiny-registry")).info.run_id


def _global_state() -> tuple:
    return mlflow.get_tracking_uri(), mlflow.get_registry_uri(), dict(os.environ)


def test_log_and_load_from_a_worker_thread_leaves_global_uris_and_environment_alone(client, run_id, checkpoint,
                                                                                    tiny_config):
    before = _global_state()
    assert before[0] != client.tracking_uri  # so pointing MLflow at the store would show

    def log_and_load():
        version = registry.log_and_register(client, run_id, checkpoint, tiny_config)
        uri = registry.model_uri(version)
        return version, registry.load_vae(uri, client), registry.version_config(client, version)

    with ThreadPoolExecutor(1) as pool:
        version, vae, config = pool.submit(log_and_load).result()
    assert _global_state() == before
    assert version.run_id == run_id and version.aliases == [tracking.CHALLENGER]
    assert type(vae).__name__ == "VAE" and vae.latent_dim == tiny_config["latent_dim"] and not vae.training
    assert config == tiny_config


def test_logged_model_is_the_runs_ready_output_and_the_versions_files(client, run_id, checkpoint, tiny_config):
    version = registry.log_and_register(client, run_id, checkpoint, tiny_config)
    (output,) = client.get_run(run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == registry.MODEL_ARTIFACT and logged.source_run_id == run_id
    assert logged.status == LoggedModelStatus.READY
    assert client.get_model_version_download_uri(version.name, version.version) == logged.artifact_location


def test_a_user_loads_the_champion_by_alias_through_mlflow_tracking_uri(client, run_id, checkpoint, tiny_config,
                                                                        monkeypatch):
    version = registry.log_and_register(client, run_id, checkpoint, tiny_config, alias=tracking.CHAMPION)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION}")
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    answer = model.predict(x)
    assert answer["reconstruction"].shape == (2, 1, 28, 28) and answer["model_version"] == str(version.version)
    assert model.metadata.run_id == run_id and model.metadata.model_id.startswith("m-")


def test_models_uris_name_a_version_or_an_alias(client, run_id, checkpoint, tiny_config):
    version = registry.log_and_register(client, run_id, checkpoint, tiny_config)
    by_number = registry.version_from_uri(client, registry.model_uri(version))
    by_alias = registry.version_from_uri(client, f"models:/{tracking.MODEL_NAME}@{tracking.CHALLENGER}")
    assert by_number.version == by_alias.version == version.version
    with pytest.raises(ValueError, match="expected models:/"):
        registry.version_from_uri(client, "runs:/abc/model")


def test_registration_warns_nothing_about_type_hints_and_the_model_still_predicts(client, run_id, checkpoint,
                                                                                  tiny_config):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        version = registry.log_and_register(client, run_id, checkpoint, tiny_config)
        model = registry.load_pyfunc(registry.model_uri(version), client)
    assert not [w for w in caught if "type hint" in str(w.message).lower()], [str(w.message) for w in caught]
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    assert model.predict(x, params={"output": "latent_mean"})["latent_mean"].shape == (3, tiny_config["latent_dim"])


def test_a_failed_upload_leaves_no_version_behind(client, run_id, tmp_path):
    """The version is created before the files (its number goes into them): if they cannot be
    written, the version is deleted again and the logged model marked FAILED."""
    with pytest.raises(Exception):
        registry.log_and_register(client, run_id, tmp_path / "absent.pth", {"latent_dim": 4})
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []
    (logged,) = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id])
    assert logged.status == LoggedModelStatus.FAILED
