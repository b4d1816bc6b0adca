"""Bad input fails the flow run at once, with the reason in its state message, and registers nothing."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterBindError

import tracking
from pipelines.training import vae_training
from tests.pipelines.conftest import FAST_EVAL


def assert_nothing_registered(client) -> None:
    assert client.search_registered_models() == []
    assert client.search_model_versions(f"name='{tracking.MODEL_NAME}'") == []


def test_unknown_config_key_fails_with_a_suggestion(prefect_harness, client, tiny_overrides):
    state = vae_training(overrides={**tiny_overrides, "latnet_dim": 3}, **FAST_EVAL, return_state=True)
    assert state.is_failed()
    assert "latnet_dim: unknown key (did you mean 'latent_dim'?)" in state.message
    assert client.search_experiments(filter_string="name = 'tiny-pipeline'") == []
    assert_nothing_registered(client)


def test_invalid_values_are_all_named(prefect_harness, client, tiny_overrides):
    state = vae_training(num_epochs=0, learning_rate=-1.0, overrides=tiny_overrides, **FAST_EVAL, return_state=True)
    assert state.is_failed()
    assert "num_epochs: must be >= 1, got 0" in state.message
    assert "learning_rate: must be > 0.0, got -1.0" in state.message
    assert_nothing_registered(client)


def test_invalid_evaluation_option_fails_before_any_run(prefect_harness, client, tiny_overrides):
    state = vae_training(overrides=tiny_overrides, **{**FAST_EVAL, "iw_k": 0}, return_state=True)
    assert state.is_failed() and "iw_k: must be an integer >= 1, got 0" in state.message
    assert_nothing_registered(client)


def test_unknown_flow_parameter_is_refused_before_a_run(prefect_harness):
    with pytest.raises(ParameterBindError, match="unexpected keyword argument 'latnet_dim'"):
        vae_training(latnet_dim=3)


def test_missing_data_fails_naming_the_files_to_provide(prefect_harness, client, tiny_overrides, tmp_path):
    state = vae_training(overrides={**tiny_overrides, "data_dir": str(tmp_path / "nowhere")}, **FAST_EVAL,
                         return_state=True)
    assert state.is_failed()
    assert "DataError: mnist data not found" in state.message and "train-images-idx3-ubyte" in state.message
    assert_nothing_registered(client)


def test_failure_after_the_run_started_marks_it_failed_and_registers_nothing(prefect_harness, client, tiny_overrides):
    # 600 tiny training images, all held out for validation: the trainer refuses, mid-flow.
    state = vae_training(overrides={**tiny_overrides, "val_size": 600}, **FAST_EVAL, return_state=True)
    assert state.is_failed() and "val_size 600 leaves no training images" in state.message
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-pipeline").experiment_id])
    assert run.info.status == "FAILED"
    assert_nothing_registered(client)


def test_every_config_key_is_a_flow_parameter_over_the_preset():
    from vae.config import PRESETS, get_default_config

    params = vae_training.parameters.properties
    own = {"preset", "overrides", "iw_k", "eval_max_images", "eval_max_train_images", "eval_probe", "eval_fid",
           "figures", "register_model", "run_kind", "resume_run_id", "tracking_wait_s"}
    assert set(params) == set(get_default_config()) | own
    assert all(params[key]["default"] is None for key in get_default_config())
    assert params["preset"]["enum"] == sorted(PRESETS) and params["preset"]["default"] == "small"


def test_a_named_config_key_applies_over_overrides(prefect_harness, client, tiny_overrides):
    state = vae_training(overrides=tiny_overrides, hidden_dims=[8, 0], **FAST_EVAL, return_state=True)
    assert state.is_failed() and "hidden_dims: every entry must be >= 1, got [8, 0]" in state.message
    assert_nothing_registered(client)
