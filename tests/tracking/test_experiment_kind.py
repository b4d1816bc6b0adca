"""Experiments open in MLflow's UI as model training: the experiment tag and the links' query."""

from __future__ import annotations

import tracking


def test_new_experiment_is_tagged_as_model_training(module_client):
    exp_id = tracking.ensure_experiment(module_client, "kind-new")
    assert module_client.get_experiment(exp_id).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_existing_untagged_experiment_gets_the_tag_and_a_chosen_kind_is_kept(module_client):
    old = module_client.create_experiment("kind-old")  # as made before the tag existed
    chosen = module_client.create_experiment("kind-chosen", tags={tracking.TAG_EXPERIMENT_KIND: "genai_development"})
    assert tracking.TAG_EXPERIMENT_KIND not in module_client.get_experiment(old).tags
    assert tracking.ensure_experiment(module_client, "kind-old") == old
    assert module_client.get_experiment(old).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    tracking.ensure_experiment(module_client, "kind-chosen")
    assert module_client.get_experiment(chosen).tags[tracking.TAG_EXPERIMENT_KIND] == "genai_development"


def test_links_ask_for_the_training_view(module_client):
    assert tracking.run_link(module_client, "3", "abc") == (
        f"{tracking.UI_URL}/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert tracking.experiment_link(module_client, "3") == (
        f"{tracking.UI_URL}/#/experiments/3?workflowType=machine_learning")
