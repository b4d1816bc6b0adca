"""A full or read-only disk and a damaged or emptied MLflow store: one ``error:`` line, exit code 2.

The faults are real OS errors, no mocks: a tiny ``tmpfs`` mounted for the test and filled up
(``ENOSPC``), or mounted read-only (``EROFS``: permissions do not stop root, a read-only file
system does). Mounting needs root (or CAP_SYS_ADMIN); without it these tests are skipped with
that reason. The store faults are a 0-byte ``mlflow.db`` and one with garbage over some of its
pages, each checked byte for byte afterwards: refused, never replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipelines.conftest import TINY, task_runs
from vae.checkpoint import load_checkpoint, save_checkpoint
from vae.files import StorageError

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [f"--{k}={' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY.items()
         if k not in ("hidden_dims", "progress")] + ["--hidden_dims", "8", "16", "--iw_k", "2", "--no_register"]


def mount_tmpfs(path: Path, options: str) -> Path:
    """Mount a tmpfs on ``path`` (skip the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system of its own."""
    yield mount_tmpfs(tmp_path / "disk", "size=2m")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=True)


def fill(disk: Path) -> None:
    """Write until the file system is full (ENOSPC)."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_on_a_full_disk_names_the_file_the_space_and_the_last_checkpoint(small_disk):
    last = small_disk / "run" / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, last)
    fill(small_disk)
    with pytest.raises(StorageError) as caught:
        save_checkpoint({"epoch": 2, "w": torch.zeros(200_000)}, last)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"cannot write {last}: No space left on device (")
    assert "MB free on" in message and f"last checkpoint saved: {last} (epoch 1, written at" in message
    assert load_checkpoint(last)["epoch"] == 1  # the old file is intact, no temporary file is left
    assert not list(last.parent.glob(".*.tmp"))


def test_a_disk_that_fills_mid_training_leaves_metrics_file_and_mlflow_agreeing(small_disk, client, tiny_config):
    import tracking
    from vae.callbacks import Callback
    from vae.train import VAETrainer

    class FillAfterFirstEpoch(Callback):  # the fault: the disk fills once epoch 1 is recorded
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 1:
                fill(small_disk)

    run_id = client.create_run(tracking.ensure_experiment(client, "full-disk")).info.run_id
    config = {**tiny_config, "checkpoint_dir": str(small_disk / "ck"), "num_epochs": 3}
    trainer = VAETrainer(config, [tracking.MLflowCallback(client, run_id), FillAfterFirstEpoch()])
    with pytest.raises(StorageError, match="No space left on device"):
        trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = client.get_metric_history(run_id, "val/nelbo")
    assert [r["epoch"] for r in rows] == [m.step for m in logged] == [1]
    assert load_checkpoint(trainer.last_path)["epoch"] == 1


@pytest.fixture(scope="module")
def cli_faults(prefect_harness, tiny_data_dir, empty_store_db, tmp_path_factory):
    """Three ``pipelines.training`` commands at once: the run folder on a read-only file system;
    the MLflow store emptied to 0 bytes; the store damaged. Each: (exit code, output, store file,
    its SHA-256 before)."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("faults")
    read_only = mount_tmpfs(root / "read-only", "ro,size=1m")
    stores = {name: root / name for name in ("read-only-run", "emptied", "damaged")}
    for store in stores.values():
        store.mkdir()
        shutil.copy(empty_store_db, store / "mlflow.db")
    (stores["emptied"] / "mlflow.db").write_bytes(b"")
    with open(stores["damaged"] / "mlflow.db", "r+b") as f:  # garbage over pages 3 to 6
        f.seek(2 * 4096)
        f.write(b"\xa5" * 4 * 4096)
    procs, before = {}, {name: sha256(store / "mlflow.db") for name, store in stores.items()}
    for name, store in stores.items():
        env = {**os.environ, "VAE_MLRUNS_DIR": str(store), "PREFECT_API_URL": PREFECT_API_URL.value()}
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipelines.training", "--data_dir", str(tiny_data_dir), "--checkpoint_dir",
             str(read_only if name == "read-only-run" else root / "ck"), *FLAGS], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=300)
        out[name] = (proc.returncode, text, stores[name] / "mlflow.db", before[name])
    yield out
    subprocess.run(["umount", "-l", str(read_only)], check=True)


@pytest.mark.parametrize("fault,words", [("emptied", "is empty (0 bytes)"), ("damaged", "is damaged")])
def test_a_broken_mlflow_store_is_refused_in_one_line_and_left_as_it_was(cli_faults, fault, words):
    rc, out, db, digest = cli_faults[fault]
    assert rc == 2 and len(out.strip().splitlines()) == 1, out
    assert out.startswith(f"error: MLflow store {db} {words}") and "move it aside" in out and "backup" in out, out
    assert sha256(db) == digest


def test_a_read_only_run_folder_fails_once_in_one_line_and_the_run_says_why(cli_faults):
    from mlflow.tracking import MlflowClient

    import tracking

    rc, out, db, _ = cli_faults["read-only-run"]
    assert rc == 2 and "Traceback" not in out and "Finished in state Failed" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "Read-only file system (" in last and "MB free on" in last, out
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE_REASON].startswith("StorageError: ")
    train = task_runs(run.data.tags[tracking.TAG_FLOW_RUN_ID])["train"]
    assert train.run_count == 1  # not retried: no retry makes a read-only disk writable
