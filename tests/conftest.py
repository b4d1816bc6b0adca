"""Shared fixtures: tiny IDX datasets, tiny configs, isolated MLflow stores and Prefect.

Everything a test writes goes under pytest's temporary folders; the real MNIST is read only by
tests that ask for ``real_data_dir`` (skipped when it is absent).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Isolation before anything imports torch/mlflow/prefect: no telemetry, no shared caches.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="vae-tests-"))
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["VAE_CACHE_DIR"] = str(_SESSION_TMP / "cache")
# Tests build their own stores and servers: nothing from a user's shell (say, after
# `source .stack/env`) may point them at shared services.
for _var in ("VAE_FAST_DEV_RUN", "VAE_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL",
             "VAE_MLRUNS_DIR", "VAE_OPTUNA_DIR"):
    os.environ.pop(_var, None)
# Tiny models gain nothing from intra-op threads, and the suite starts many processes at once
# (workers, servers): one thread each keeps them from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_REAL_DATA_DIR = os.environ.get("VAE_DATA_DIR")

# The longest files first (in `make test`'s 4 workers on the 2-core VM, 2026-12-07: from ~365 s for
# test_commands.py down to ~60 s), so that under `--dist loadfile` none of them starts late and runs
# on alone after the rest have finished. Every other file keeps its collection order after these.
SLOW_FILES = (
    "test_commands.py", "vae/test_readme_snippets.py", "tuning/test_workers.py", "pipelines/test_deployment.py",
    "pipelines/test_cli_errors.py", "reliability/test_pipeline_stops.py", "reliability/test_concurrency.py",
    "reliability/test_tracking_outbox.py", "scale/test_stack.py", "reliability/test_optuna_faults.py",
    "scale/test_deployment.py", "pipelines/test_quality_pipeline.py", "pipelines/test_training_flow.py",
)
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).resolve().relative_to(_TESTS).as_posix(), len(rank)))


FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images with labels 0-9: a bright bar whose position and angle encode the
    label, plus noise. Structured enough for a VAE's loss to fall within a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), dtype=np.float32)
    for i, c in enumerate(labels):
        angle = np.pi * c / 10
        dist = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle))
        images[i] = np.clip(1.5 - dist / 2, 0, 1) * (np.hypot(xx - 14, yy - 14) < 11)
    images += rng.normal(0, 0.05, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels


def write_idx_dataset(root: Path, n_train: int = 600, n_test: int = 200, gz: bool = True,
                      folder: str = "MNIST", sums: bool = True) -> Path:
    """Write a tiny dataset as torchvision lays it out: ``root/<folder>/raw/*-ubyte[.gz]``."""
    from vae.data import write_idx_files  # not at the top: torch loads after the environment above is set

    arrays = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = make_digits(n, seed)
    write_idx_files(root / folder / "raw", arrays, gz=gz, sums=sums)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A session-wide tiny MNIST (600 train, 200 test images, gzipped, with SHA256SUMS)."""
    return write_idx_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture
def tiny_config(tmp_path, tiny_data_dir) -> dict:
    """A config dict for a model that trains in about a second on the tiny dataset."""
    from vae.config import get_default_config

    cfg = get_default_config()
    cfg.update(data_dir=str(tiny_data_dir), checkpoint_dir=str(tmp_path / "checkpoints"),
               experiment_name="tiny", hidden_dims=[8, 16], latent_dim=4, batch_size=50,
               num_epochs=2, val_size=100, progress=False, sample_every=1, ema_decay=0.9,
               learning_rate=3e-3, log_every=5)
    return cfg


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST (``$VAE_DATA_DIR``); tests that need it are skipped when it is absent."""
    if not _REAL_DATA_DIR or not (Path(_REAL_DATA_DIR) / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found: set VAE_DATA_DIR to a folder holding MNIST/raw")
    return Path(_REAL_DATA_DIR)


PG_URL = os.environ.get("VAE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def pg_connect(database: str = "postgres"):
    """A psycopg connection (autocommit) to one database of the test server (``$VAE_TEST_PG_URL``)."""
    import psycopg

    return psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://") + "/" + database,
                           autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def postgres() -> str:
    """The PostgreSQL server URL (no database); skips when nothing answers there."""
    try:
        with pg_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any connection failure means: no server for these tests
        pytest.skip(f"PostgreSQL does not answer at {PG_URL.split('://')[1]} "
                    f"(start it, or set VAE_TEST_PG_URL): {type(e).__name__}: {str(e).splitlines()[0]}")
    return PG_URL


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Path:
    """A fresh embedded MLflow store (SQLite + artifacts) for one test."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("VAE_MLRUNS_DIR", str(store))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema, created once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def seed_store(store: Path, template: Path) -> None:
    """Give ``store`` a copy of the template database (``empty_store_db``): no schema to create."""
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, store / "mlflow.db")


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, empty_store_db):
    """A fresh MLflow store shared by the tests of one module (flows are slow to run twice)."""
    with pytest.MonkeyPatch.context() as mp:
        store = tmp_path_factory.mktemp("mlruns")
        seed_store(store, empty_store_db)
        mp.setenv("VAE_MLRUNS_DIR", str(store))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield store


@pytest.fixture(scope="module")
def module_client(module_store):
    """An MlflowClient on the module's store (``module_store``)."""
    import tracking

    return tracking.get_client()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session", autouse=True)
def _prefect_console_on_the_session_stream():
    """Prefect binds its console handler to ``sys.stderr`` when its logging is first set up (on
    ``import prefect``). Do that before any test's capsys/capfd, so no handler keeps writing into
    a capture file that a finished test has closed ("I/O operation on closed file")."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    yield
