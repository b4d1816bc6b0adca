"""Fixtures of the pipeline tests: tiny flow overrides, an MLflow store per test, Prefect artifacts.

The flows run in this process against the session's Prefect test server (``prefect_harness``)
and write to a real SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import pytest

from tests.conftest import seed_store

# The tiny model of tests/conftest.py's tiny_config, as flow overrides.
TINY = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "num_epochs": 2, "val_size": 100,
        "max_train_samples": 0, "progress": False, "sample_every": 1, "ema_decay": 0.9, "learning_rate": 3e-3,
        "log_every": 5}
# Cheap evaluation: a small IW bound on 100 test images, no probe, no classifier FID.
FAST_EVAL = {"iw_k": 8, "eval_max_images": 100, "eval_probe": False, "eval_fid": False}


def tiny_overrides_for(data_dir, checkpoint_dir, experiment_name: str = "tiny-pipeline") -> dict:
    return {**TINY, "data_dir": str(data_dir), "checkpoint_dir": str(checkpoint_dir),
            "experiment_name": experiment_name}


@pytest.fixture
def tiny_overrides(tmp_path, tiny_data_dir) -> dict:
    """Config overrides for the flows: the tiny model on the tiny data (this test's folders)."""
    return tiny_overrides_for(tiny_data_dir, tmp_path / "checkpoints")


@pytest.fixture
def client(mlflow_store, empty_store_db):
    """An MlflowClient on this test's own store (``mlflow_store``)."""
    import tracking

    seed_store(mlflow_store, empty_store_db)
    return tracking.get_client()


def prefect_artifact(key: str):
    """The newest Prefect artifact with ``key`` (from the test server), or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                 sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


def task_runs(flow_run_id: str) -> dict[str, object]:
    """Task runs of a flow run by task name (``prepare-data``, ``train``, ...), states included."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}
