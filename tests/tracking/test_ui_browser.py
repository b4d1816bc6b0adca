"""In a real browser: MLflow's UI opens the project's experiment on its runs, not on GenAI traces.

Starts ``mlflow server`` on 127.0.0.1 (a free port, a fresh store), makes an experiment and a run
through the project's own ``tracking`` code, and has headless Chromium render the link the
project prints. MLflow 3.17's UI opens an experiment as "GenAI" (traces overview, "No data
available") unless the link asks for the model-training view. Skipped where Chromium is not
installed (``apt-get install chromium``): CI machines start without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import tracking
from tests.reliability.faultproxy import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                 reason="no Chromium at /usr/bin/chromium (apt-get install chromium) for the UI check")]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a fresh SQLite store; yields its URL, stops its process group after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _up(url):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _render(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time: the UI's requests finish first)."""
    out = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
                          "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_experiment_link_opens_on_the_runs_table(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = tracking.get_client()
    exp_id = tracking.ensure_experiment(client, "ui-check")
    run = client.create_run(exp_id, run_name="ui-check-run-x7")
    tracking.log_metrics(client, run.info.run_id, {"val/nelbo": 101.5}, step=1)
    client.set_terminated(run.info.run_id)
    assert client.get_experiment(exp_id).tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND

    link = tracking.experiment_link(client, exp_id)
    assert link.startswith(mlflow_server)
    dom = _render(link, tmp_path / "chromium")
    assert "ui-check-run-x7" in dom, "the runs table (with the run's name) is not on the experiment page"
    assert "No data available" not in dom, "the page shows the GenAI overview, not the training runs"
