"""A real MLflow tracking server that goes away or hangs: training never waits on it, what it
missed arrives once and in order when it is back, a flow that ends while it is away says so in one
line and ``python -m pipelines.sync`` delivers the rest (model included), a hung server is detected
in seconds, a run whose process was killed is ended by the next start and continues with
``--resume RUN_ID`` into the same MLflow run, and a SIGTERM while the model is registered (held by
the server being away) waits for the registration to end.

One ``mlflow server`` (SQLite) for the module, behind :class:`FaultProxy`: ``cut`` is the server
down (connections refused), ``freeze`` a server that accepts connections and never answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.reliability.conftest import (FAST_EVAL, PYTHON, ROOT, TINY_FLOW, assert_one_line_error, call_cli, cli_env,
                                        cli_flags, start_pipeline, stop_pipeline, tally, task_running, wait_for)
from tests.reliability.faultproxy import FaultProxy, free_port, health_answers, start_mlflow_server, stop_process_group

TINY = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "val_size": 100, "max_train_samples": 0,
        "progress": False, "sample_every": 0, "ema_decay": 0.9, "learning_rate": 3e-3, "log_every": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A FaultProxy in front of a real ``mlflow server``; ``.url`` is the proxy's address."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler on the session's stderr, not on a test's capsys
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port, env=cli_env(root), timeout=90)
    try:
        with FaultProxy("127.0.0.1", port) as proxy:
            proxy.url = f"http://127.0.0.1:{proxy.port}"
            yield proxy
    finally:
        stop_process_group(proc)


@pytest.fixture
def on_server(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    server.resume()
    assert wait_for(lambda: health_answers(server.url), timeout=10)
    yield server
    server.resume()


def test_an_outage_mid_training_blocks_no_epoch_and_every_metric_arrives_once_in_order(on_server, tiny_config,
                                                                                      tmp_path):
    import tracking
    from vae.train import VAETrainer

    client = tracking.get_client()
    run_id = client.create_run(tracking.ensure_experiment(client, "outbox-outage")).info.run_id
    sender = tracking.open_sender(tmp_path / "outbox", run_id, tracking.get_client(check=False))
    blocked, held = [], []

    class Timed(tracking.MLflowCallback):
        def on_epoch_end(self, trainer, epoch, metrics):
            t0 = time.monotonic()
            super().on_epoch_end(trainer, epoch, metrics)
            blocked.append(time.monotonic() - t0)
            held.append(len(sender.outbox.pending()))
            if epoch == 1:
                on_server.cut(3600)  # the server goes away after epoch 1 ...
            elif epoch == 4:
                on_server.resume()  # ... and is back after epoch 4
            time.sleep(0.1)

    tally("faults")
    VAETrainer({**tiny_config, "num_epochs": 6, "sample_every": 0}, [Timed(sender.outbox, run_id)]).train()
    assert held[3] >= 3, f"the outage held nothing back: {held}"
    assert max(blocked) < 1.0, f"an epoch waited on the tracking server: {blocked}"
    assert sender.close(30), sender.last_error
    history = sorted(client.get_metric_history(run_id, "val/nelbo"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in history] == list(range(1, 7)), "each epoch once, in order"
    tally("runs_checked")


def test_a_flow_ending_while_the_server_is_away_says_so_and_sync_delivers_the_rest(on_server, prefect_harness,
                                                                                   tiny_data_dir, tmp_path, capsys):
    import tracking
    from pipelines.sync import cli as sync_cli
    from pipelines.training import vae_training

    ckpt = tmp_path / "ck"

    def cut_once_the_run_logs():
        if wait_for(lambda: any((ckpt / "pipeline").glob("*/mlflow-outbox.jsonl")), timeout=120):
            on_server.cut(3600)  # down until resume(): for the rest of the flow

    threading.Thread(target=cut_once_the_run_logs, daemon=True).start()
    tally("faults")
    out = vae_training(overrides={**TINY, "num_epochs": 3, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                                  "experiment_name": "outbox-flow"}, **FAST_EVAL, figures=False, tracking_wait_s=1)
    line = out["tracking_pending"]
    assert out["model_version"] is None and line and "\n" not in line, out
    assert on_server.url in line and "python -m pipelines.sync" in line and out["run_id"] in line
    on_server.resume()
    assert wait_for(lambda: health_answers(on_server.url), timeout=10)
    code, stdout, err = call_cli(sync_cli, ["--checkpoint_dir", str(ckpt), "--experiment_name", "outbox-flow"], capsys)
    assert code == 0 and "delivered" in stdout, err[-3000:]
    client = tracking.get_client()
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(out["run_id"], "val/nelbo")] == [1, 2, 3]
    assert "test/iw_nll_k4" in run.data.metrics
    assert {f.path for f in client.list_artifacts(out["run_id"], "checkpoints")} >= {
        "checkpoints/best_model.pth", "checkpoints/metrics.jsonl"}, "the checkpoints were not delivered"
    (version,) = client.search_model_versions(f"run_id='{out['run_id']}'")
    assert client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHALLENGER).version == version.version
    code, stdout, _ = call_cli(sync_cli, ["--checkpoint_dir", str(ckpt), "--experiment_name", "outbox-flow"], capsys)
    assert code == 0 and "nothing to deliver" in stdout  # and nothing twice
    tally("runs_checked")


def test_sigterm_while_the_model_is_registered_waits_for_the_registration_to_end(on_server, prefect_harness, procs,
                                                                                 tiny_data_dir, tmp_path, capsys):
    """SIGTERM during the registration (held here by the server being away, for ``--tracking_wait_s``):
    it is not cut in half; it ends (queued), the run is complete, one `stopped:` line, exit 130;
    `pipelines.sync` then registers the model once."""
    import tracking
    from pipelines.sync import cli as sync_cli

    ckpt = tmp_path / "ck"
    flags = cli_flags({**TINY_FLOW, "num_epochs": 1, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                       "experiment_name": "outbox-stop-register", "iw_k": 4, "eval_max_images": 50,
                       "tracking_wait_s": 8})
    proc = start_pipeline(procs, "pipelines.training", ["--preset", "small", *flags],
                          MLFLOW_TRACKING_URI=on_server.url)
    assert wait_for(lambda: any((ckpt / "pipeline").glob("*/mlflow-outbox.jsonl")), timeout=180, proc=proc), \
        proc.communicate()[1][-3000:]
    on_server.cut(3600)  # from here on the run logs through its outbox; the registration waits for it
    run_id, _, last_line = stop_pipeline(proc, lambda: task_running("register"), ckpt)
    assert last_line == ("stopped: SIGTERM arrived while the model was registered, so the registration finished "
                         f"first (queued: `python -m pipelines.sync --checkpoint_dir {ckpt}` delivers it); MLflow run "
                         f"{run_id} is complete"), last_line
    on_server.resume()
    assert wait_for(lambda: health_answers(on_server.url), timeout=10)
    code, stdout, err = call_cli(sync_cli, ["--checkpoint_dir", str(ckpt), "--experiment_name",
                                            "outbox-stop-register"], capsys)
    assert code == 0 and "delivered" in stdout, err[-3000:]
    client = tracking.get_client()
    assert client.get_run(run_id).info.status == "FINISHED" and "test/iw_nll_k4" in client.get_run(run_id).data.metrics
    assert len(client.search_model_versions(f"run_id='{run_id}'")) == 1
    tally("runs_checked")


def test_a_retraining_whose_challenger_cannot_be_registered_ends_pending_and_touches_no_alias(
        on_server, prefect_harness, tiny_data_dir, tmp_path):
    import tracking
    from pipelines.retraining import summary_text, vae_retraining

    client = tracking.get_client()
    champion_before = champion_version(client)
    ckpt = tmp_path / "ck"

    def cut_once_the_run_logs():
        if wait_for(lambda: any((ckpt / "pipeline").glob("*/mlflow-outbox.jsonl")), timeout=120):
            on_server.cut(3600)

    threading.Thread(target=cut_once_the_run_logs, daemon=True).start()
    tally("faults")
    out = vae_retraining(overrides={**TINY, "num_epochs": 2, "data_dir": str(tiny_data_dir),
                                    "checkpoint_dir": str(ckpt), "experiment_name": "outbox-retraining"},
                         **FAST_EVAL, figures=False, force=True, tracking_wait_s=1)
    assert out["decision"] == "pending" and out["challenger_version"] is None, out
    assert "python -m pipelines.sync" in out["reason"] and out["run_id"]
    assert summary_text(out).splitlines()[0] == f"retraining pending: {out['reason']}"
    on_server.resume()
    assert wait_for(lambda: health_answers(on_server.url), timeout=10)
    assert champion_version(client) == champion_before, "a pending challenger moved the champion"
    assert client.search_model_versions(f"run_id='{out['run_id']}'") == [], "registered although the server was away"
    tally("runs_checked")


def champion_version(client) -> str | None:
    import mlflow

    import tracking

    try:
        return client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHAMPION).version
    except mlflow.exceptions.MlflowException:
        return None


def test_a_frozen_server_is_detected_within_seconds_with_one_line(on_server, tiny_data_dir, tmp_path, capsys):
    from pipelines.training import cli

    on_server.freeze()  # accepts connections, answers nothing
    tally("faults")
    t0 = time.monotonic()
    code, _, err = call_cli(cli, ["--preset", "small", "--data_dir", str(tiny_data_dir), "--checkpoint_dir",
                                  str(tmp_path / "ck"), "--max_train_samples", "0", "--val_size", "100",
                                  "--num_epochs", "1", "--progress", "false"], capsys)
    elapsed = time.monotonic() - t0
    assert code == 2 and elapsed < 12, (code, elapsed, err[-2000:])
    assert_one_line_error(err, f"MLflow tracking server {on_server.url} is unreachable (no answer within")
    assert not (tmp_path / "ck").exists()


def test_a_killed_run_is_ended_by_the_next_start_and_resumes_into_the_same_run(on_server, prefect_harness,
                                                                                tiny_data_dir, tmp_path):
    from prefect.settings import PREFECT_API_URL

    import tracking
    from pipelines.training import vae_training
    from vae.checkpoint import load_checkpoint

    ckpt = tmp_path / "ck"
    overrides = {**TINY, "num_epochs": 500, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(ckpt),
                 "experiment_name": "outbox-killed"}
    env = {**cli_env(tmp_path), "MLFLOW_TRACKING_URI": on_server.url, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([PYTHON, "-m", "tests.reliability._flow_driver",
                                 json.dumps({"overrides": overrides, **FAST_EVAL})], env=env, cwd=ROOT,
                                stdout=err, stderr=err, start_new_session=True)
    try:
        found = wait_for(lambda: list(ckpt.glob("pipeline/*/outbox-killed/last.pth")), timeout=120, proc=proc)
        assert found, log.read_text()[-3000:]
        tally("faults")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (last,) = ckpt.glob("pipeline/*/outbox-killed/last.pth")
    run_id = last.parent.parent.name
    client = tracking.get_client()
    assert client.get_run(run_id).info.status == "RUNNING"  # what a killed process leaves
    done = load_checkpoint(last)["epoch"]
    out = vae_training(resume_run_id=run_id, num_epochs=done + 1, overrides={"checkpoint_dir": str(ckpt)},
                       **FAST_EVAL, figures=False, tracking_wait_s=10)
    run = client.get_run(run_id)
    assert out["run_id"] == run_id and run.info.status == "FINISHED"
    assert "died" in run.data.tags["resumed_from"]
    assert f"--resume {run_id} --checkpoint_dir {ckpt}" in run.data.tags["resumed_from"]
    assert run.data.tags["resumed_from"].startswith("FAILED")
    steps = [m.step for m in client.get_metric_history(run_id, "val/nelbo")]
    assert steps[-1] == done + 1 and len(steps) == len(set(steps)), steps
    assert out["model_version"] and client.get_model_version(tracking.MODEL_NAME, out["model_version"]["version"]
                                                             ).run_id == run_id
    tally("runs_checked")


def test_resuming_a_run_without_a_checkpoint_here_is_one_line(tmp_path, capsys):
    from pipelines.training import cli

    code, _, err = call_cli(cli, ["--resume", "abc123", "--checkpoint_dir", str(tmp_path / "ck")], capsys)
    assert code == 2
    assert_one_line_error(err, "cannot resume run abc123", str(tmp_path / "ck" / "pipeline" / "abc123"))
