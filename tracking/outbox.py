"""A run's durable outbox: training never waits on the tracking server.

What a pipeline run logs (metrics, params, tags, artifacts, its end) is appended to
``mlflow-outbox.jsonl`` in the run's checkpoint folder, one JSON record a line, flushed and
fsynced; artifacts are first copied beside it (``mlflow-outbox-artifacts/``), so the original may
go. A :class:`Sender` thread posts the records in order and, after each one the store accepted,
writes how far it got (``mlflow-outbox.offset``, atomically): a restart, another process or
``python -m pipelines.sync`` resumes from there, so nothing is sent twice. Only a crash between a
post and its offset write repeats one record, and that is harmless: MLflow skips a metric with
the same (key, value, timestamp, step), a param logged again with its value and a tag set again.

While the server is away the sender retries (one short request, then a pause of 0.5 s doubling to
2 s), and the training thread only appends to a file. Senders of one outbox, in any process, take
turns under a file lock (``mlflow-outbox.lock``).

:class:`Outbox` answers the few ``MlflowClient`` calls a run makes (``log_batch``, ``set_tag``,
``log_artifact(s)``, ``set_terminated``), so :func:`tracking.log_metrics` and
:class:`tracking.MLflowCallback` write to it as they would to a client. Records of other kinds
(``register``, written by the pipelines) are delivered by handlers the sender is given.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae.files import storage_error, write_atomic

__all__ = ["Outbox", "Sender", "Handler", "OUTBOX_FILE", "deliver_pending", "open_sender", "short_http_requests"]

OUTBOX_FILE, OFFSET_FILE, LOCK_FILE, STAGED_DIR = ("mlflow-outbox.jsonl", "mlflow-outbox.offset",
                                                   "mlflow-outbox.lock", "mlflow-outbox-artifacts")
Handler = Callable[[MlflowClient, Mapping[str, Any]], None]
# Refusals that a retry cannot change (a bad value, a deleted run): the record is set aside, not retried.
FINAL_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
                "PERMISSION_DENIED"}
# One short attempt per request while the sender posts (MLflow's default: 7 retries over ~4 minutes,
# each waiting up to 120 s, during which nothing else could be sent or stopped).
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
_ENV_LOCK = threading.Lock()


@contextmanager
def short_http_requests() -> Iterator[None]:
    """Within the block, MLflow HTTP requests make one attempt of at most 10 s (settings a user
    made in the environment are kept). MLflow reads these variables at every request."""
    with _ENV_LOCK:
        added = {k: v for k, v in SHORT_HTTP.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


class Outbox:
    """The append-only log of one run's updates in ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path, run_id: str):
        self.folder, self.run_id = Path(folder), run_id
        self.path = self.folder / OUTBOX_FILE
        self.changed = threading.Condition()
        self._seq = 0
        self._drop_torn_tail()

    # -- what a run logs, as MlflowClient's calls -------------------------------------------------
    def log_batch(self, run_id: str, metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
                  tags: Iterable[RunTag] = (), synchronous: bool = True) -> None:
        self.append({"op": "batch", "run_id": run_id,
                     "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                     "params": [[p.key, p.value] for p in params], "tags": [[t.key, t.value] for t in tags]})

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file into the outbox now (the original may change or go), post it later."""
        self._seq += 1
        staged = self.folder / STAGED_DIR / f"{time.time_ns()}-{self._seq}" / Path(local_path).name
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, staged)
        self.append({"op": "artifact", "run_id": run_id, "file": str(staged.relative_to(self.folder)),
                     "artifact_path": artifact_path})

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                sub = path.parent.relative_to(local_dir).as_posix()
                parts = [p for p in (artifact_path, "" if sub == "." else sub) if p]
                self.log_artifact(run_id, path, "/".join(parts) or None)

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self.append({"op": "terminate", "run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    # -- the log itself ---------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record durably (flush + fsync) and wake the sender."""
        line = json.dumps(dict(record), allow_nan=True) + "\n"
        with self.changed:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # a full or read-only disk: one line naming the file, never retried
                err = storage_error(e, self.path)
                if err is None:
                    raise
                raise err from e
            self.changed.notify_all()

    def delivered(self) -> int:
        """Bytes of the log the store has accepted."""
        try:
            return int((self.folder / OFFSET_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def mark_delivered(self, offset: int) -> None:
        write_atomic(self.folder / OFFSET_FILE, str(offset))

    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        """(end offset, record) of every complete record not yet delivered, in order; a torn last
        line (the process died while writing it) is not a record."""
        start = self.delivered()
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return []
        out, pos = [], start
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            pos += len(line)
            if line.strip():
                out.append((pos, json.loads(line)))
        return out

    def _drop_torn_tail(self) -> None:
        """Cut a last line without its newline (a writer died mid-line): the next append would
        otherwise glue a record onto it."""
        try:
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    @contextmanager
    def lock(self) -> Iterator[bool]:
        """Try to take the lock senders of this outbox take turns under (any process); yields
        whether it was taken (False: another sender is posting these records now)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True  # released when the file closes


def deliver(client: MlflowClient, outbox: Outbox, record: Mapping[str, Any],
            handlers: Mapping[str, Handler]) -> None:
    """Post one record to the store (raises what the store raised)."""
    op, run_id = record["op"], record.get("run_id", outbox.run_id)
    if op == "batch":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, v) for k, v in record["params"]],
                         tags=[RunTag(k, v) for k, v in record["tags"]], synchronous=True)
    elif op == "artifact":
        staged = outbox.folder / record["file"]
        if staged.is_file():  # gone: posted before a crash kept the offset from saying so
            client.log_artifact(run_id, str(staged), record["artifact_path"])
            shutil.rmtree(staged.parent, ignore_errors=True)
    elif op == "terminate":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        handlers[op](client, record)


def deliver_pending(client: MlflowClient, outbox: Outbox, handlers: Mapping[str, Handler] | None = None,
                    stop: threading.Event | None = None) -> int:
    """Post every pending record in order, under the outbox's lock; returns how many were posted.

    Another sender posting these records now (its lock is held) is left to it: 0 are posted.

    Raises:
        What the store raised for the first record it did not accept (those before it count as
        delivered). A refusal a retry cannot change (:data:`FINAL_ERRORS`) sets the record aside
        in ``mlflow-outbox.rejected.jsonl`` and goes on.
    """
    posted = 0
    with outbox.lock() as mine, short_http_requests():
        for end, record in outbox.pending() if mine else ():
            if stop is not None and stop.is_set():
                break
            try:
                deliver(client, outbox, record, handlers or {})
            except MlflowException as e:
                if e.error_code not in FINAL_ERRORS:
                    raise
                with open(outbox.folder / "mlflow-outbox.rejected.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({**record, "error": str(e)[:2000]}) + "\n")
            outbox.mark_delivered(end)
            posted += 1
    return posted


class Sender:
    """A daemon thread that drains an :class:`Outbox` as records arrive (see the module docstring).

    Args:
        client: the store's client (constructing one does not contact the server).
        handlers: how to deliver records of other kinds, by ``op``.
    """

    def __init__(self, outbox: Outbox, client: MlflowClient, handlers: Mapping[str, Handler] | None = None):
        self.outbox, self.client, self.handlers = outbox, client, dict(handlers or {})
        self.last_error: str | None = None
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-outbox-{outbox.run_id[:8]}", daemon=True)

    def start(self) -> "Sender":
        self._thread.start()
        return self

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything appended so far to arrive; True if it did."""
        end = time.monotonic() + timeout
        with self.outbox.changed:
            self.outbox.changed.notify_all()
            while self.outbox.pending():
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self.outbox.changed.wait(min(left, 0.1))
        return True

    def close(self, timeout: float) -> bool:
        """:meth:`flush`, then stop the thread; True if nothing is left to send."""
        drained = self.flush(timeout)
        self.closed = True
        self._stop.set()
        with self.outbox.changed:
            self.outbox.changed.notify_all()
        self._thread.join(timeout=15)
        return drained and not self.outbox.pending()

    def _run(self) -> None:
        pause = 0.5
        while not self._stop.is_set():
            try:
                posted = deliver_pending(self.client, self.outbox, self.handlers, self._stop)
                self.last_error, pause = None, 0.5
            except Exception as e:  # noqa: BLE001 - the server is away or failing: keep the record, retry
                self.last_error, posted = f"{type(e).__name__}: {e}"[:500], 0
                self._stop.wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            with self.outbox.changed:
                if posted:
                    self.outbox.changed.notify_all()
                elif not self._stop.is_set():
                    self.outbox.changed.wait(0.5)


_SENDERS: dict[Path, Sender] = {}
_SENDERS_LOCK = threading.Lock()


def open_sender(folder: str | Path, run_id: str, client: MlflowClient,
                handlers: Mapping[str, Handler] | None = None) -> Sender:
    """This process's running sender of the outbox in ``folder`` (started if none is): the tasks of
    one flow run share it, and with it one :class:`Outbox` and its wake-ups."""
    key = Path(folder).resolve()
    with _SENDERS_LOCK:
        sender = _SENDERS.get(key)
        if sender is None or sender.closed:
            sender = _SENDERS[key] = Sender(Outbox(key, run_id), client, handlers).start()
        sender.handlers.update(handlers or {})
        return sender
