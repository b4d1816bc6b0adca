"""The vae-retraining flow: the first model is promoted; a clearly better one is; the same model
again is kept (its difference is within noise); nothing changed since the champion ends the flow
at once; the decision reads validation figures only, never a test one."""

from __future__ import annotations

import json
import subprocess

import pytest

import tracking
from pipelines import console
from pipelines.promotion import MARGIN_SE, decide
from pipelines.retraining import summary_text, vae_retraining
from tests.pipelines.conftest import FAST_EVAL, prefect_artifact, tiny_overrides_for

UNTRAINED = {"num_epochs": 1, "learning_rate": 1e-6}  # barely moves from the initial weights
TRAINED = {"num_epochs": 3, "learning_rate": 3e-3}


def commit(repo) -> None:
    """A new commit of the checkout the flows run in: a new code version, with no training code changed."""
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "commit", "--allow-empty", "-q", "-m", "nightly"], check=True)


@pytest.fixture(scope="module")
def outcomes(prefect_harness, module_store, module_client, tiny_data_dir, tmp_path_factory):
    """Four nightly retrainings in one checkout (a git repository of its own, so the code version
    is a clean commit): untrained (no champion yet), trained (clearly better), the same again
    (nothing changed), the same after a new commit (the same model: within noise).
    Each: (the flow's result, model versions registered after it)."""
    checkout = tmp_path_factory.mktemp("checkout")
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    commit(checkout)
    base = tiny_overrides_for(tiny_data_dir, tmp_path_factory.mktemp("checkpoints"), "tiny-retraining")
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(checkout)
        for change in (UNTRAINED, TRAINED, TRAINED, "new commit"):
            if change == "new commit":
                commit(checkout)
                change = TRAINED
            state = vae_retraining(overrides={**base, **change}, **FAST_EVAL, figures=False, return_state=True)
            assert state.is_completed(), state.message
            versions = module_client.search_model_versions(f"name='{tracking.MODEL_NAME}'")
            out.append(({**state.result(), "state_message": state.message}, sorted(int(v.version) for v in versions)))
    return out


def alias(client, name: str) -> str:
    return str(client.get_model_version_by_alias(tracking.MODEL_NAME, name).version)


def test_first_model_is_promoted(outcomes):
    first, versions = outcomes[0]
    assert first["decision"] == "promoted" and "no champion yet" in first["reason"]
    assert first["champion_version"] == first["challenger_version"] == "1" and versions == [1]


def test_clearly_better_model_is_promoted_by_more_than_the_noise(outcomes):
    second, _ = outcomes[1]
    assert second["decision"] == "promoted" and second["champion_version"] == "2"
    assert second["difference"] < -MARGIN_SE * second["difference_se"]
    assert second["difference"] == pytest.approx(second["challenger_score"] - second["champion_score"], abs=1e-9)
    assert second["compare_images"] == 100  # the whole validation split (val_size 100), held out from both
    assert second["challenger_test"] < second["champion_test"]  # reported beside it


def test_nothing_changed_ends_at_once_and_trains_nothing(outcomes):
    third, versions = outcomes[2]
    assert third["decision"] == "unchanged" and third["run_id"] is None
    assert "nothing changed since the champion (version 2)" in third["reason"] and "nothing trained" in third["reason"]
    assert versions == [1, 2]  # no new version
    assert third["state_message"] == third["reason"]  # Completed, with the reason
    assert summary_text({**third}).startswith("retraining unchanged: nothing changed since the champion")


def test_same_model_again_is_kept_within_noise(outcomes, module_client):
    fourth, versions = outcomes[3]
    assert versions == [1, 2, 3]
    assert fourth["decision"] == "kept" and "within noise" in fourth["reason"]
    assert abs(fourth["difference"]) <= MARGIN_SE * fourth["difference_se"]
    assert alias(module_client, tracking.CHAMPION) == "2" and alias(module_client, tracking.CHALLENGER) == "3"


def test_the_decision_never_reads_a_test_figure(outcomes):
    for out, _ in outcomes:
        received = out["decided_on"]  # exactly what decide() was given
        if received is None:
            continue
        assert received["key"] == "val/iw_nll_k8"
        assert not [k for k in received if "test" in k] and "test" not in json.dumps(received)
        assert decide(received) == (out["decision"] == "promoted", out["reason"])


def test_validation_test_and_difference_are_tags_of_the_challenger_run(outcomes, module_client):
    fourth, _ = outcomes[3]
    tags = module_client.get_run(fourth["run_id"]).data.tags
    assert tags[tracking.TAG_DECISION] == "kept" and "within noise" in tags[tracking.TAG_DECISION_REASON]
    assert tags[tracking.TAG_SCORE_METRIC] == "val/iw_nll_k8"
    for tag, key in ((tracking.TAG_CHALLENGER_SCORE, "challenger_score"), (tracking.TAG_CHAMPION_SCORE, "champion_score"),
                     (tracking.TAG_SCORE_DIFFERENCE, "difference"), (tracking.TAG_SCORE_DIFFERENCE_SE, "difference_se"),
                     (tracking.TAG_CHALLENGER_TEST, "challenger_test"), (tracking.TAG_CHAMPION_TEST, "champion_test")):
        assert float(tags[tag]) == pytest.approx(fourth[key], abs=1e-5), tag
    assert tags[tracking.TAG_COMPARE_IMAGES] == "100" and tags[tracking.TAG_RUN_KIND] == "retraining"
    assert module_client.get_model_version(tracking.MODEL_NAME, "3").tags[tracking.TAG_SCORE_METRIC] == "val/iw_nll_k8"


def test_champion_test_figure_uses_the_same_protocol(outcomes, module_client):
    # The champion (version 2) scored again on the same test images and k as the fourth challenger.
    second_run = module_client.get_run(outcomes[1][0]["run_id"])
    assert outcomes[3][0]["champion_test"] == pytest.approx(second_run.data.metrics["test/iw_nll_k8"], rel=1e-6)


def test_decision_is_a_prefect_artifact_with_both_figures(outcomes):
    artifact = prefect_artifact("vae-retraining-decision")
    assert artifact.type == "markdown"
    assert "kept" in artifact.data and outcomes[3][0]["run_id"] in artifact.data
    assert "`val/iw_nll_k8` (decides)" in artifact.data and "`test/iw_nll_k8` (reported)" in artifact.data
    assert "standard error" in artifact.data


def test_cli_output_is_strict_json_and_a_summary_that_names_the_rule(outcomes):
    first = outcomes[0][0]  # no champion yet: its scores are None or NaN, which `json.dumps` would write as NaN

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    parsed = json.loads(console.dumps(first), parse_constant=refuse)
    assert parsed["champion_score"] is None and parsed["challenger_test"] == pytest.approx(first["challenger_test"])
    text = summary_text(first)
    assert text.startswith("retraining promoted: no champion yet") and "none before this run" in text
    assert "IW bound, k=8, first 100 test images" in text and "nats per image" in text
    kept = summary_text(outcomes[3][0])
    assert "champion was: version 2" in kept and "paired SE" in kept and "the test set is never used" in kept


def test_retraining_resume_flags_are_checked_in_one_line_before_any_flow(mlflow_store, capsys, tmp_path):
    from pipelines.retraining import _main
    from vae.cli import run_cli

    assert run_cli(_main, ["--checkpoint_dir", str(tmp_path)]) == 2
    assert "--checkpoint_dir: only with --resume" in capsys.readouterr().err
    assert run_cli(_main, ["--resume", "abc123", "--checkpoint_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log of creating the store
    assert err.startswith("error: cannot resume run abc123: no ") and "--checkpoint_dir" in err, err
