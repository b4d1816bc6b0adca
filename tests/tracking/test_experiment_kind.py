"""Experiments open in MLflow's UI as model training: the experiment tag and the links' query."""

from __future__ import annotations

import pytest

import tracking


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One embedded store for the module (creating its schema takes seconds); distinct experiment names."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_MLRUNS_DIR", str(tmp_path_factory.mktemp("mlruns")))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tracking.get_client()


def test_new_experiment_is_tagged_as_model_training(client):
    exp_id = tracking.ensure_experiment(client, "kind-new")
    assert client.get_experiment(exp_id).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_existing_untagged_experiment_gets_the_tag_and_a_chosen_kind_is_kept(client):
    old = client.create_experiment("kind-old")  # as made before the tag existed
    chosen = client.create_experiment("kind-chosen", tags={tracking.TAG_EXPERIMENT_KIND: "genai_development"})
    assert tracking.TAG_EXPERIMENT_KIND not in client.get_experiment(old).tags
    assert tracking.ensure_experiment(client, "kind-old") == old
    assert client.get_experiment(old).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    tracking.ensure_experiment(client, "kind-chosen")
    assert client.get_experiment(chosen).tags[tracking.TAG_EXPERIMENT_KIND] == "genai_development"


def test_links_ask_for_the_training_view(client):
    assert tracking.run_link(client, "3", "abc") == (
        f"{tracking.UI_URL}/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert tracking.experiment_link(client, "3") == f"{tracking.UI_URL}/#/experiments/3?workflowType=machine_learning"
