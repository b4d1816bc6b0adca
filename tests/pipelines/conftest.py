"""Fixtures of the pipeline tests: tiny flow parameters, an MLflow client on the test's store."""

from __future__ import annotations

import pytest

# The tiny model's keys as flow overrides (tiny_config minus what the flow chooses itself).
FLOW_KEYS = ("data_dir", "checkpoint_dir", "hidden_dims", "latent_dim", "batch_size", "num_epochs", "val_size",
             "progress", "sample_every", "ema_decay", "learning_rate", "log_every")
# Cheap evaluation: a small IW bound on 100 test images, no probe, no classifier FID.
FAST_EVAL = {"iw_k": 8, "eval_max_images": 100, "eval_probe": False, "eval_fid": False}


@pytest.fixture
def tiny_overrides(tiny_config) -> dict:
    """Config overrides for the flows: the tiny model on the tiny data, in a fresh experiment."""
    return {k: tiny_config[k] for k in FLOW_KEYS} | {"max_train_samples": 0, "experiment_name": "tiny-pipeline"}


@pytest.fixture
def client(mlflow_store):
    """An MlflowClient on the test's own store."""
    from pipelines import tracking

    return tracking.get_client()
