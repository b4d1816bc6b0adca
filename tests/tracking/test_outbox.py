"""The run's outbox on a real (SQLite) MLflow store: records arrive in order and once, a restart
resends nothing, a repeated record (a crash between a post and its offset) changes nothing, a
torn last line is dropped, artifacts are copied at once and posted later."""

from __future__ import annotations

import pytest

import tracking
from tracking.outbox import OUTBOX_FILE, Outbox, deliver_pending


@pytest.fixture
def run(module_client):
    """(client, a new run's id)."""
    exp = tracking.ensure_experiment(module_client, "outbox")
    return module_client, module_client.create_run(exp).info.run_id


def _steps(client, run_id, key="val/nelbo"):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_records_arrive_in_order_once_and_a_restart_resends_nothing(run, tmp_path):
    client, run_id = run
    box = Outbox(tmp_path / "box", run_id)
    for epoch in (1, 2, 3):
        tracking.log_metrics(box, run_id, {"val/nelbo": 100.0 - epoch}, step=epoch)
    tracking.log_params(box, run_id, {"model.latent_dim": 4})
    assert _steps(client, run_id) == []  # nothing is posted by logging itself
    assert deliver_pending(client, box) == 4
    assert _steps(client, run_id) == [(1, 99.0), (2, 98.0), (3, 97.0)]
    again = Outbox(tmp_path / "box", run_id)  # a new process on the same folder
    assert again.pending() == [] and deliver_pending(client, again) == 0
    assert _steps(client, run_id) == [(1, 99.0), (2, 98.0), (3, 97.0)]
    assert client.get_run(run_id).data.params == {"model.latent_dim": "4"}


def test_a_record_posted_twice_after_a_crash_changes_nothing(run, tmp_path):
    client, run_id = run
    box = Outbox(tmp_path / "box", run_id)
    tracking.log_metrics(box, run_id, {"val/nelbo": 90.0, "train/loss": 91.0}, step=1)
    tracking.log_params(box, run_id, {"model.latent_dim": 4})
    box.set_tag(run_id, "stage", "trained")
    deliver_pending(client, box)
    box.mark_delivered(0)  # the offset write was lost: everything goes again
    assert deliver_pending(client, box) == 3
    assert _steps(client, run_id) == [(1, 90.0)] and _steps(client, run_id, "train/loss") == [(1, 91.0)]
    assert client.get_run(run_id).data.tags["stage"] == "trained"


def test_a_torn_last_line_is_dropped_and_appending_goes_on(run, tmp_path):
    client, run_id = run
    box = Outbox(tmp_path / "box", run_id)
    tracking.log_metrics(box, run_id, {"val/nelbo": 80.0}, step=1)
    with open(tmp_path / "box" / OUTBOX_FILE, "a") as f:
        f.write('{"op": "batch", "run_id": "')  # the writer died mid-line
    assert len(box.pending()) == 1  # not a record
    box = Outbox(tmp_path / "box", run_id)  # the next process cuts it off
    tracking.log_metrics(box, run_id, {"val/nelbo": 79.0}, step=2)
    assert deliver_pending(client, box) == 2
    assert _steps(client, run_id) == [(1, 80.0), (2, 79.0)]


def test_artifacts_are_copied_at_once_and_posted_later(run, tmp_path):
    client, run_id = run
    box = Outbox(tmp_path / "box", run_id)
    src = tmp_path / "figs"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(b"png-a")
    (src / "sub" / "b.txt").write_text("b")
    box.log_artifacts(run_id, src, "figures")
    for p in (src / "a.png", src / "sub" / "b.txt"):
        p.unlink()  # the flow's temporary folder is gone before the server is back
    box.set_terminated(run_id, "FINISHED")
    assert deliver_pending(client, box) == 3
    paths = sorted(f.path for f in client.list_artifacts(run_id, "figures")) + \
        sorted(f.path for f in client.list_artifacts(run_id, "figures/sub"))
    assert paths == ["figures/a.png", "figures/sub", "figures/sub/b.txt"]
    assert not any((tmp_path / "box" / "mlflow-outbox-artifacts").rglob("*.*")), "staged copies are removed"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_refused_record_is_set_aside_and_the_rest_goes_on(run, tmp_path):
    client, run_id = run
    box = Outbox(tmp_path / "box", run_id)
    tracking.log_params(box, run_id, {"model.latent_dim": 4})
    tracking.log_params(box, run_id, {"model.latent_dim": 8})  # MLflow refuses to change a param
    tracking.log_metrics(box, run_id, {"val/nelbo": 70.0}, step=1)
    assert deliver_pending(client, box) == 3
    assert _steps(client, run_id) == [(1, 70.0)]
    assert "latent_dim" in (tmp_path / "box" / "mlflow-outbox.rejected.jsonl").read_text()
