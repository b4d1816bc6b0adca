"""The vae-sweep Prefect flow: runs a study and ends with the summary artifact."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_vae_sweep_flow_runs_a_study_and_publishes_the_best_trial(prefect_harness, optuna_dir, study_name,
                                                                 tiny_fixed):
    from prefect.artifacts import Artifact

    from tuning.flow import ARTIFACT_KEY, vae_sweep

    summary = vae_sweep(n_trials=2, study_name=study_name, preset="default", latent_dims=[2, 4], threads=1,
                        plots=False, fixed={**tiny_fixed, "num_epochs": 1})
    assert summary["counts"]["complete"] == 2 and summary["best"] is not None
    markdown = Artifact.get(ARTIFACT_KEY).data
    assert f"Optuna study `{study_name}`" in markdown and summary["mlflow_link"] in markdown
    assert f"Best trial: {summary['best']['number']}" in markdown


@pytest.mark.slow
def test_vae_sweep_flow_fails_on_bad_input_before_any_trial(prefect_harness, optuna_dir, study_name):
    from tuning.flow import vae_sweep

    state = vae_sweep(n_trials=2, study_name=study_name, fixed={"latnt_dim": 4}, return_state=True)
    assert state.is_failed() and "latnt_dim: unknown key" in str(state.message)
    assert not (optuna_dir / "studies.db").exists()
