"""Task policies, with real Prefect runs: retries on transient I/O only; the data cache key."""

from __future__ import annotations

import os

import pytest
from prefect import flow, task

from pipelines.tasks import RETRY, data_cache_key
from vae.config import ConfigError


def _attempts(error: Exception) -> int:
    calls = []

    @task(name="flaky", **{**RETRY, "retry_delay_seconds": 0})
    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return len(calls)

    @flow(name="retry-policy")
    def run() -> None:
        flaky()

    run(return_state=True)
    return len(calls)


def test_tasks_retry_on_transient_io_errors(prefect_harness):
    assert _attempts(OSError("disk briefly unavailable")) == 2


def test_tasks_do_not_retry_bad_config(prefect_harness):
    assert _attempts(ConfigError(["latent_dim: must be >= 1, got 0"])) == 1


def test_data_cache_key_follows_the_files(tiny_data_dir):
    params = {"data_dir": str(tiny_data_dir), "dataset": "mnist"}
    key = data_cache_key(None, params)
    assert key == data_cache_key(None, dict(params))
    assert key != data_cache_key(None, {**params, "dataset": "fashion_mnist"})
    labels = tiny_data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    st = labels.stat()
    try:
        os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert data_cache_key(None, params) != key
    finally:
        os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_cache_key(None, params) == key
