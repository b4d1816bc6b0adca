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
import ssl
import urllib.error
import urllib.parse
import urllib.request
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


REACHABLE_TIMEOUT_S = 5.0  # a server that accepts but does not answer is given up after this


def check_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail fast when an http(s) tracking server is down or hung: MLflow's own retries take minutes.

    One HTTP request to the server's ``/health``, without retries: a refused connection fails at
    once, and a server that accepts connections but does not answer (stopped, deadlocked) within
    ``timeout`` seconds fails with the same line. Any HTTP answer, even an error status, counts
    as reachable.

    Raises:
        TrackingUnavailableError: naming the server and what to do.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return  # it answered, in TLS the client does not accept: MLflow's own calls say so
        if isinstance(reason, (TimeoutError, socket.timeout)):
            why = f"no answer within {timeout:g} s"
        else:
            why = getattr(reason, "strerror", None) or str(reason)
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({why}); start it, or unset "
            f"MLFLOW_TRACKING_URI to use the local store") from None


def get_client(check: bool = True) -> MlflowClient:
    """A client on :func:`tracking_uri` (the registry lives in the same store).

    Args:
        check: first make sure a tracking server answers (:func:`check_reachable`); a client for
            an outbox's sender skips it (it retries by itself).
    Raises:
        TrackingUnavailableError: ``MLFLOW_TRACKING_URI`` names a server that does not answer.
    """
    uri = tracking_uri()
    if is_local_store(uri):
        local_store_dir().mkdir(parents=True, exist_ok=True)
    elif check:
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
    A missing file is fine: a new store. Nothing is written, except that SQLite rolls back the
    transaction of a process killed mid-write (its hot journal), as every connection to the file
    does: a read-only connection cannot, and failed such an intact store with "attempt to write a
    readonly database". On a read-only disk SQLite opens the file read-only, as before.

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
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=30)) as conn:
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
