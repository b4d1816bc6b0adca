"""The vae-training flow, run for real on tiny data: what MLflow and Prefect hold afterwards."""

from __future__ import annotations

import numpy as np
import pytest

import tracking
from pipelines import registry
from pipelines.training import vae_training
from tests.pipelines.conftest import FAST_EVAL, prefect_artifact, task_runs, tiny_overrides_for

FIGURES = ("reconstructions", "prior_samples", "latent_grid", "traversals", "interpolations", "loss_curves")


@pytest.fixture(scope="module")
def runs(prefect_harness, module_store, tiny_data_dir, tmp_path_factory):
    """Two flow runs into one store: 2 epochs, then 1 epoch (same data: the data task is cached)."""
    overrides = tiny_overrides_for(tiny_data_dir, tmp_path_factory.mktemp("checkpoints"))
    first = vae_training(overrides=overrides, **FAST_EVAL, return_state=True)
    second = vae_training(overrides={**overrides, "num_epochs": 1}, **FAST_EVAL, return_state=True)
    return first, second


@pytest.fixture(scope="module")
def out(runs):
    return runs[0].result()


@pytest.fixture(scope="module")
def run(out, module_client):
    return module_client.get_run(out["run_id"])


def test_flow_runs_complete_in_prefect(runs):
    assert [s.type.value for s in runs] == ["COMPLETED", "COMPLETED"]


def test_params_are_flat_config_keys_named_by_section(run):
    params = run.data.params
    assert params["model.latent_dim"] == "4"
    assert params["model.hidden_dims"] == "[8, 16]"
    assert params["train.num_epochs"] == "2"
    assert params["loss.beta_end"] == "1.0"
    assert params["data.dataset"] == "mnist"


def test_metrics_are_logged_once_per_epoch(run, module_client):
    for key in ("train/loss", "train/recon", "train/kl", "train/beta", "train/lr", "train/images_per_s",
                "val/nelbo", "val/loss"):
        history = module_client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key


def test_test_metrics_of_the_evaluation_are_logged(run, out):
    metrics = run.data.metrics
    assert metrics["test/iw_nll_k8"] == pytest.approx(out["metrics"]["test/iw_nll_k8"])
    assert metrics["test/nelbo"] == pytest.approx(out["metrics"]["test/nelbo"])
    assert out["score_key"] == "test/iw_nll_k8"
    assert np.isfinite(metrics["test/iw_nll_k8"])


def test_tags_name_commit_dataset_device_torch_and_flow_run(run, out, runs):
    tags = run.data.tags
    assert tags[tracking.TAG_DATASET_DIGEST] == out["data_digest"]
    assert tags[tracking.TAG_FLOW_RUN_ID] == str(runs[0].state_details.flow_run_id)
    assert tags[tracking.TAG_DEVICE] == "cpu"
    assert tags[tracking.TAG_RUN_KIND] == "training"
    assert tags[tracking.TAG_TORCH_VERSION]
    assert len(tags[tracking.TAG_GIT_COMMIT].split("+")[0]) in (40, len("unknown"))


def test_dataset_is_the_run_input_with_its_digest(run, out):
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "mnist"
    assert out["data_digest"].startswith(inp.dataset.digest)


def test_figures_and_checkpoints_are_artifacts_under_stable_paths(run, module_client):
    figures = {a.path for a in module_client.list_artifacts(run.info.run_id, "figures")}
    assert {f"figures/{name}.png" for name in FIGURES} <= figures
    checkpoints = {a.path for a in module_client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/best_model.pth", "checkpoints/config.json", "checkpoints/metrics.jsonl"} <= checkpoints


def test_mlflow_run_is_finished(run):
    assert run.info.status == "FINISHED"


def test_model_is_registered_and_loads_back_as_a_vae(out, module_client):
    version = module_client.get_model_version(tracking.MODEL_NAME, out["model_version"]["version"])
    assert version.run_id == out["run_id"]
    vae = registry.load_vae(registry.model_uri(version), module_client)
    assert type(vae).__name__ == "VAE" and vae.latent_dim == 4 and not vae.training
    assert registry.version_config(module_client, version)["hidden_dims"] == [8, 16]


def test_registered_model_has_signature_input_example_and_predicts(out, module_client):
    model = registry.load_pyfunc(out["model_version"]["uri"], module_client)
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
    assert model.metadata.saved_input_example_info is not None
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    assert model.predict(x)["reconstruction"].shape == (3, 1, 28, 28)
    assert model.predict(x, params={"output": "latent_mean"})["latent_mean"].shape == (3, 4)


def test_summary_is_a_prefect_markdown_artifact_linking_the_run(runs):
    artifact = prefect_artifact("vae-training-summary")
    second_run_id = runs[1].result()["run_id"]
    assert artifact.type == "markdown"
    assert second_run_id in artifact.data and "test/iw_nll_k8" in artifact.data


def test_second_run_reuses_the_cached_data_and_takes_the_challenger_alias(runs, module_client):
    first, second = (s.result() for s in runs)
    tasks = task_runs(str(runs[1].state_details.flow_run_id))
    assert tasks["prepare-data"].state.name == "Cached"
    assert second["data_digest"] == first["data_digest"]
    assert str(module_client.get_model_version_by_alias(tracking.MODEL_NAME, "challenger").version) == \
        second["model_version"]["version"]
    versions = module_client.search_model_versions(f"name='{tracking.MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # nothing deleted


def test_summary_artifacts_list_openable_figures_and_a_metrics_table(runs):
    import json
    from pathlib import Path

    second = runs[1].result()
    markdown = prefect_artifact("vae-training-summary").data
    assert "Likelihoods: IW bound, k=8, first 100 test images binarised once with a fixed seed" in markdown
    listed = [line.split("`")[1] for line in markdown.splitlines() if line.startswith("- ") and ".png`" in line]
    assert sorted(Path(p).stem for p in listed) == sorted(Path(p).stem for p in second["figures"].values())
    assert set(FIGURES) <= {Path(p).stem for p in listed}
    assert all(Path(p).is_file() and second["run_id"] in p for p in listed)
    table = prefect_artifact("vae-training-metrics")
    assert table.type == "table"
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert rows["test/iw_nll_k8"] == pytest.approx(second["metrics"]["test/iw_nll_k8"], rel=1e-5)


def test_demo_summary_explains_the_score_and_prints_paths_and_commands_that_open(out, module_client):
    from pathlib import Path

    from pipelines.demo import summary

    text = summary(out, module_client, 1.0)
    assert f"test/iw_nll_k8 = {out['metrics']['test/iw_nll_k8']:.2f} nats per image" in text
    assert "IW bound, k=1,000, first 500 test images binarised once with a fixed seed" in text  # the demo's protocol
    assert "lower is better" in text and "published 1-layer VAE: 86.8" in text
    figures = [line.strip() for line in text.splitlines() if line.strip().endswith(".png")]
    assert len(figures) == len(out["figures"]) and all(Path(p).is_absolute() and Path(p).is_file() for p in figures)
    commands = [line for line in text.splitlines() if " -m " in line]
    assert commands and all(".venv/bin/python -m " in line for line in commands)
    assert Path(out["best_model_path"]).is_file() and out["best_model_path"] in text


def test_artifact_links_are_local_paths_server_urls_or_the_stores_uri(tmp_path):
    local = tracking.artifact_location("sqlite:///x.db", (tmp_path / "a" / "r1" / "artifacts").as_uri(), "r1",
                                       "figures/reconstructions.png")
    assert local == str(tmp_path.resolve() / "a" / "r1" / "artifacts" / "figures" / "reconstructions.png")
    served = tracking.artifact_location("http://127.0.0.1:5000/", "mlflow-artifacts:/1/r1/artifacts", "r1",
                                        "figures/reconstructions.png")
    assert served == "http://127.0.0.1:5000/get-artifact?path=figures%2Freconstructions.png&run_uuid=r1"
    assert tracking.artifact_location("postgresql://db", "s3://bucket/r1/artifacts", "r1", "figures/x.png") == \
        "s3://bucket/r1/artifacts/figures/x.png"
