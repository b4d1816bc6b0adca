"""Task policies, with real Prefect runs: retries on transient I/O only; the data cache key; the
evaluation protocol (the probe's training images, the fast path)."""

from __future__ import annotations

import errno
import os

import pytest
from prefect import flow, task

from pipelines.tasks import RETRY, data_cache_key, evaluate_model
from vae.config import ConfigError, validate_config
from vae.files import StorageError


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


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EROFS, "Read-only file system"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                                                "writing file data/0: file write failed: No space left on device"),
                                   StorageError(errno.ENOSPC, "cannot write last.pth: No space left on device")])
def test_tasks_do_not_retry_a_full_or_read_only_disk(prefect_harness, error):
    assert _attempts(error) == 1


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


@pytest.fixture
def untrained(tiny_config, tiny_data_dir):
    """(a fresh tiny VAE, the tiny dataset, its config): evaluation needs no training to be compared."""
    import torch

    from vae.data import load_dataset
    from vae.model import VAE

    cfg = validate_config(tiny_config)
    torch.manual_seed(0)
    return VAE(**cfg.model.as_kwargs()).eval(), load_dataset(tiny_data_dir, "mnist"), cfg


def test_probe_training_images_follow_eval_max_train_images_not_the_test_count(untrained):
    from vae.evaluate import evaluate

    model, data, cfg = untrained
    for n in (0, 120):  # 0 = all 600 training images, whatever the number of test images
        got = evaluate_model(model, data, cfg, k=1, max_test_images=50, max_train_images=n, fid=False)
        want = evaluate(model, data, loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize, k=1,
                        fid=False, max_test_images=50, max_train_images=n, seed=cfg.run.seed)
        assert got["test/probe_acc"] == want["test/probe_acc"] and got["test/num_images"] == 50


def test_evaluation_takes_the_fast_path_only_when_the_config_says_so(untrained):
    from vae import fast

    model, data, cfg = untrained
    plain = evaluate_model(model, data, cfg.replace(fast=False), k=4, max_test_images=50, probe=False, fid=False)
    assert set(fast.forms(model).values()) == {"plain"}
    quick = evaluate_model(model, data, cfg, k=4, max_test_images=50, probe=False, fid=False)
    assert {"bias_after", "output_conv"} <= set(fast.forms(model).values())
    assert quick["test/iw_nll_k4"] == pytest.approx(plain["test/iw_nll_k4"], rel=1e-5)
    assert quick["test/nelbo"] == pytest.approx(plain["test/nelbo"], rel=1e-5)


def test_resume_command_names_the_checkpoint_folder_unless_it_is_the_default(tmp_path):
    """`--resume` looks for a run under the default folder, so the printed command names any other."""
    from pipelines import sync

    assert sync.resume_command("abc") == "python -m pipelines.training --resume abc"
    assert sync.resume_command("abc", "checkpoints") == "python -m pipelines.training --resume abc"
    folder = tmp_path / "my runs"
    assert sync.resume_command("abc", folder) == f"python -m pipelines.training --resume abc --checkpoint_dir '{folder}'"
    assert sync.checkpoint_root(sync.run_folder(folder, "abc")) == folder
