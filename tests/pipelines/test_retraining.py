"""The vae-retraining flow: the first model is promoted, a worse one is not, a better one is."""

from __future__ import annotations

import pytest

import tracking
from pipelines.retraining import vae_retraining
from tests.pipelines.conftest import FAST_EVAL, prefect_artifact, tiny_overrides_for

UNTRAINED = {"num_epochs": 1, "learning_rate": 1e-6}  # barely moves from the initial weights
TRAINED = {"num_epochs": 3, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def outcomes(prefect_harness, module_store, tiny_data_dir, tmp_path_factory):
    """Three retrainings in order: untrained (no champion yet), trained (better), untrained (worse)."""
    base = tiny_overrides_for(tiny_data_dir, tmp_path_factory.mktemp("checkpoints"), "tiny-retraining")
    out = []
    for change in (UNTRAINED, TRAINED, UNTRAINED):
        state = vae_retraining(overrides={**base, **change}, **FAST_EVAL, figures=False, return_state=True)
        assert state.is_completed(), state.message
        out.append(state.result())
    return out


def champion(client) -> str:
    return str(client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION).version)


def test_first_model_is_promoted(outcomes):
    first = outcomes[0]
    assert first["decision"] == "promoted" and "no champion yet" in first["reason"]
    assert first["champion_version"] == first["challenger_version"] == "1"


def test_better_model_moves_champion(outcomes):
    second = outcomes[1]
    assert second["decision"] == "promoted"
    assert second["challenger_score"] < second["champion_score"]
    assert second["champion_version"] == "2"


def test_worse_model_leaves_champion_where_it_was(outcomes, module_client):
    third = outcomes[2]
    assert third["decision"] == "kept"
    assert third["challenger_score"] > third["champion_score"]
    assert champion(module_client) == "2"
    assert str(module_client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHALLENGER).version) == "3"


def test_decision_scores_and_reason_are_tags_of_the_challenger_run(outcomes, module_client):
    third = outcomes[2]
    tags = module_client.get_run(third["run_id"]).data.tags
    assert tags[tracking.TAG_DECISION] == "kept"
    assert tags[tracking.TAG_SCORE_METRIC] == "test/iw_nll_k8"
    assert float(tags[tracking.TAG_CHALLENGER_SCORE]) == pytest.approx(third["challenger_score"], abs=1e-5)
    assert float(tags[tracking.TAG_CHAMPION_SCORE]) == pytest.approx(third["champion_score"], abs=1e-5)
    assert ">=" in tags[tracking.TAG_DECISION_REASON]
    assert tags[tracking.TAG_RUN_KIND] == "retraining"
    version = module_client.get_model_version(tracking.MODEL_NAME, "3")
    assert version.tags[tracking.TAG_DECISION] == "kept"


def test_champion_is_rescored_with_the_same_protocol(outcomes, module_client):
    # The champion (version 2) scored on the same test images and k as the third challenger.
    second_run = module_client.get_run(outcomes[1]["run_id"])
    assert outcomes[2]["champion_score"] == pytest.approx(second_run.data.metrics["test/iw_nll_k8"], rel=1e-6)


def test_decision_is_a_prefect_artifact(outcomes):
    artifact = prefect_artifact("vae-retraining-decision")
    assert artifact.type == "markdown"
    assert "kept" in artifact.data and outcomes[2]["run_id"] in artifact.data


def test_no_version_is_deleted(outcomes, module_client):
    versions = module_client.search_model_versions(f"name='{tracking.MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]


def test_cli_output_is_strict_json_and_a_summary_that_names_the_protocol(outcomes):
    import json

    from pipelines import console
    from pipelines.retraining import summary_text

    first = outcomes[0]  # no champion yet: its score is NaN, which `json.dumps` would write as NaN

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    parsed = json.loads(console.dumps(first), parse_constant=refuse)
    assert parsed["champion_score"] is None and parsed["challenger_score"] == pytest.approx(first["challenger_score"])
    text = summary_text(first)
    assert text.startswith("retraining promoted: no champion yet") and "none before this run" in text
    assert "IW bound, k=8, first 100 test images" in text and "nats per image" in text
    assert "champion was: version 1" in summary_text(outcomes[1])
