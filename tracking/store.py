"""Where runs go and how to reach them: the tracking URI, a client, experiments, run links.

``$MLFLOW_TRACKING_URI`` when set (a tracking server, PostgreSQL, ...), else a SQLite store inside
``mlruns/`` of the working directory (``mlruns/mlflow.db``, artifacts in ``mlruns/artifacts``;
``$VAE_MLRUNS_DIR`` moves it): the local backend MLflow 3 recommends, with the model registry.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Mapping

from mlflow.tracking import MlflowClient

from tracking.names import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND
from vae import settings
from vae.errors import UserError
from vae.files import exclusive_file_lock

def local_store_dir() -> Path:
    """The embedded store's folder: ``$VAE_MLRUNS_DIR`` or ``./mlruns``."""
    return settings.current().mlruns_dir


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the SQLite store in :func:`local_store_dir`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def is_local_store(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith("sqlite:///")


class TrackingUnavailableError(UserError, ConnectionError):
    """The configured MLflow tracking server does not answer (raised at once, not after minutes)."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server is down: MLflow's own retries take minutes.

    Raises:
        TrackingUnavailableError: naming the server and what to do.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({e.strerror or e}); start it, or unset "
            f"MLFLOW_TRACKING_URI to use the local store") from None


def get_client() -> MlflowClient:
    """A client on :func:`tracking_uri` (the registry lives in the same store).

    Raises:
        TrackingUnavailableError: ``MLFLOW_TRACKING_URI`` names a server that does not answer.
    """
    uri = tracking_uri()
    if is_local_store(uri):
        local_store_dir().mkdir(parents=True, exist_ok=True)
    else:
        check_reachable(uri)
    if is_local_store(uri) and uri not in _READY_STORES:
        client = _open_local_store_once(uri)
        _READY_STORES.add(uri)
        return client
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_READY_STORES: set[str] = set()  # local store URIs whose schema this process has seen ready


class StoreDamagedError(UserError, RuntimeError):
    """The local MLflow store's database is empty or damaged: refused, never replaced."""


SQLITE_HEADER = b"SQLite format 3\x00"


def check_local_store(db: Path) -> None:
    """Refuse a store file that MLflow would misread: 0 bytes (SQLite and MLflow would silently make a
    new, empty store over it, orphaning its artifacts), not SQLite, or failing ``PRAGMA quick_check``.
    A missing file is fine: a new store. The file is only read.

    Raises:
        StoreDamagedError: naming the file and how to recover.
    """
    if not db.exists():
        return
    recover = (f"restore {db.name} from a backup, or move it aside (mv {db} {db}.damaged) to start a new, "
               f"empty store")
    with open(db, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if not header:
        raise StoreDamagedError(f"MLflow store {db} is empty (0 bytes): its runs and models are gone; {recover}")
    if header != SQLITE_HEADER:
        raise StoreDamagedError(f"MLflow store {db} is not an SQLite database; {recover}")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as conn:
            result = [row[0] for row in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        result = [str(e)]
    if result != ["ok"]:
        raise StoreDamagedError(f"MLflow store {db} is damaged ({'; '.join(result)[:200]}); {recover}")


def _open_local_store_once(uri: str) -> MlflowClient:
    """Open a local store under an exclusive file lock: processes that start at once on a new
    SQLite store would otherwise race on creating its schema (one of them crashes). The file is
    checked first (:func:`check_local_store`), under the lock: a store being created is never
    seen half-made."""
    with exclusive_file_lock(local_store_dir() / ".schema.lock"):
        check_local_store(Path(uri[len("sqlite:///"):]))
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates or migrates the tables
        client.search_registered_models(max_results=1)  # and the registry's
    return client


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (artifacts under ``mlruns/artifacts``) if new.

    Every experiment the project uses carries :data:`tracking.names.TAG_EXPERIMENT_KIND` (model
    training), also one created before the tag existed, so MLflow's UI opens it on its runs.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        mark_training_experiment(client, exp.experiment_id, exp.tags)
        return exp.experiment_id
    location = None
    if is_local_store(client.tracking_uri):
        location = (local_store_dir() / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        mark_training_experiment(client, exp.experiment_id, exp.tags)
        return exp.experiment_id


def mark_training_experiment(client: MlflowClient, experiment_id: str, tags: Mapping[str, str] | None = None) -> None:
    """Tag an experiment as model training (``mlflow.experimentKind``) unless it already says a kind:
    a kind a user chose in the UI is left alone. ``tags``: the experiment's tags, if already read."""
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    if TAG_EXPERIMENT_KIND not in tags:
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
