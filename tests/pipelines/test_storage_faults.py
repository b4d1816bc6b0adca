"""A full or read-only disk and a damaged or emptied MLflow store: one ``error:`` line, exit code 2.

The faults are real OS errors, no mocks: a tiny ``tmpfs`` mounted for the test and filled up
(``ENOSPC``), or mounted read-only (``EROFS``: permissions do not stop root, a read-only file
system does). Mounting needs root (or CAP_SYS_ADMIN); without it these tests are skipped with
that reason. The store faults are a 0-byte ``mlflow.db`` and one with garbage over some of its
pages, each checked byte for byte afterwards: refused, never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipelines.conftest import TINY, task_runs
from tests.reliability.conftest import tally  # counted with tests/reliability (BENCHMARKS.md, "Reliability")
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
    with open(disk / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_on_a_full_disk_names_the_file_the_space_and_the_last_checkpoint(small_disk):
    last = small_disk / "run" / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, last)
    fill(small_disk)
    tally("faults")
    with pytest.raises(StorageError) as caught:
        save_checkpoint({"epoch": 2, "w": torch.zeros(200_000)}, last)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"cannot write {last}: No space left on device (")
    assert "MB free on" in message and f"last checkpoint saved: {last} (epoch 1, written at" in message
    assert load_checkpoint(last)["epoch"] == 1  # the old file is intact, no temporary file is left
    assert not list(last.parent.glob(".*.tmp"))
    tally("checkpoints_checked")


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
    tally("faults")
    with pytest.raises(StorageError, match="No space left on device"):
        trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = client.get_metric_history(run_id, "val/nelbo")
    assert [r["epoch"] for r in rows] == [m.step for m in logged] == [1]
    assert load_checkpoint(trainer.last_path)["epoch"] == 1
    tally("runs_checked")
    tally("checkpoints_checked")


def damage(db: Path) -> None:
    """Garbage after the 100-byte header: over the page that holds the schema."""
    with open(db, "r+b") as f:
        f.seek(100)
        f.write(b"\xa5" * (4096 - 100))


def test_an_emptied_mlflow_store_is_refused_in_one_line_and_left_as_it_was(tiny_data_dir, tmp_path):
    store = tmp_path / "mlruns"
    store.mkdir()
    (store / "mlflow.db").write_bytes(b"")
    tally("faults")
    env = {**os.environ, "VAE_MLRUNS_DIR": str(store), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # no flow may start
    done = subprocess.run([sys.executable, "-m", "pipelines.training", "--data_dir", str(tiny_data_dir), *FLAGS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and len(out.strip().splitlines()) == 1, out
    assert out.startswith(f"error: MLflow store {store / 'mlflow.db'} is empty (0 bytes)"), out
    assert "move it aside" in out and "backup" in out
    assert (store / "mlflow.db").stat().st_size == 0 and sorted(p.name for p in store.iterdir()) == [
        ".schema.lock", "mlflow.db"]  # nothing created over it or beside it


def test_a_damaged_mlflow_store_is_refused_in_one_line_and_left_as_it_was(empty_store_db, tmp_path, monkeypatch,
                                                                         capfd):
    import tracking
    from vae.cli import run_cli

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store_db, db)
    damage(db)
    tally("faults")
    before = sha256(db)
    monkeypatch.setenv("VAE_MLRUNS_DIR", str(db.parent))
    assert run_cli(lambda argv: tracking.get_client() and 0) == 2  # what every command does before a flow starts
    err = capfd.readouterr().err
    assert err.startswith(f"error: MLflow store {db} is damaged (") and len(err.strip().splitlines()) == 1, err
    assert "move it aside" in err and sha256(db) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system of its own."""
    yield mount_tmpfs(tmp_path / "read-only", "ro,size=1m")
    subprocess.run(["umount", "-l", str(tmp_path / "read-only")], check=True)


def test_a_read_only_run_folder_fails_once_in_one_line_and_the_run_says_why(prefect_harness, client, read_only_dir,
                                                                           tiny_data_dir, capfd):
    import tracking
    from pipelines import training
    from vae.cli import run_cli

    from prefect.logging.configuration import ensure_logging_setup

    with capfd.disabled():
        ensure_logging_setup()  # Prefect's console handlers keep the session's stderr, not this test's capture
    argv = ["--data_dir", str(tiny_data_dir), "--checkpoint_dir", str(read_only_dir), *FLAGS]
    tally("faults")
    assert run_cli(training._main, argv) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {read_only_dir}/pipeline/") and "Read-only file system (" in last
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE_REASON].startswith("StorageError: ")
    runs = task_runs(run.data.tags[tracking.TAG_FLOW_RUN_ID])
    failed = [name for name, r in runs.items() if r.state.is_failed()]
    assert failed == ["tag-run"]  # the first write into the run folder: the run's outbox
    assert runs["tag-run"].run_count == 1  # not retried: no retry makes a read-only disk writable
    tally("runs_checked")


def test_a_run_folder_under_a_regular_file_is_one_storage_error(tmp_path):
    # Needs no mount: a path through a regular file is ENOTDIR for root as for anyone.
    from vae.files import write_atomic

    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "run" / "metrics.jsonl"
    tally("faults")
    with pytest.raises(StorageError) as caught:
        write_atomic(target, "{}\n")
    assert caught.value.errno == errno.ENOTDIR
    assert str(caught.value).startswith(f"cannot write {target}: Not a directory (") and "MB free on" in str(caught.value)


def test_the_store_check_refuses_what_is_not_sqlite_and_passes_a_healthy_or_new_store(empty_store_db, tmp_path):
    from tracking.store import StoreDamagedError, check_local_store

    check_local_store(empty_store_db)
    check_local_store(tmp_path / "new" / "mlflow.db")  # missing: a new store
    text = tmp_path / "mlflow.db"
    text.write_text("these are not the runs you are looking for")
    with pytest.raises(StoreDamagedError, match=f"MLflow store {text} is not an SQLite database; restore"):
        check_local_store(text)


def test_a_store_whose_writer_was_killed_mid_transaction_is_not_called_damaged(tmp_path):
    """A SIGKILL during a write leaves a hot journal: the next start rolls it back, it does not
    refuse the store (seen when a sweep worker was killed mid-write and the rerun said damaged)."""
    from tracking.store import check_local_store

    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("kept" * 100,)] * 2000)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time\n"
        f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "conn.execute('PRAGMA cache_size=1'); conn.execute('BEGIN IMMEDIATE')\n"
        "conn.execute(\"UPDATE t SET x = 'lost'\")  # spills to the file: the journal holds the old pages\n"
        "print('ready', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "ready\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    tally("faults")
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # a hot journal, its writer gone
    check_local_store(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*), min(x), max(x) FROM t").fetchone() == (2000, "kept" * 100, "kept" * 100)
