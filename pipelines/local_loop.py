"""The local deployment loop as code: a Prefect server on loopback, a process pool, the
deployments of ``prefect.yaml``, a worker; used by the deployment test and the latency benchmark.

Each piece is a child process in its own process group, stopped by :meth:`LocalLoop.close`
(a worker needs SIGTERM, then SIGINT). Everything Prefect writes goes under ``home``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "vae-pool"  # prefect.yaml's work pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLoop:
    """Start with :meth:`start_server`, then :meth:`create_pool`, :meth:`deploy`, :meth:`start_worker`."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, port: int | None = None):
        self.home, self.port = Path(home), port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, **(env or {}), "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.home.mkdir(parents=True, exist_ok=True)

    # -- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([PREFECT, *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server; returns the completed process."""
        return subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start_server(self, timeout: float = 120) -> None:
        self._spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--analytics-off",
                    "--no-ui", "--no-late-runs")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log('server')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{self.log('server')[-3000:]}")

    def create_pool(self) -> None:
        self._check(self.cli("--no-prompt", "work-pool", "create", POOL, "--type", "process", "--overwrite"))

    def deploy(self, *names: str) -> None:
        """``prefect --no-prompt deploy --all`` (or ``--name`` each of ``names``) from prefect.yaml."""
        which = [a for n in names for a in ("--name", n)] or ["--all"]
        self._check(self.cli("--no-prompt", "deploy", *which, timeout=600))

    def start_worker(self) -> None:
        self._spawn("worker", "worker", "start", "--pool", POOL, "--type", "process", "--limit", "2")

    def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGINT), then the server; wait for both."""
        for name in ("worker", "server"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __enter__(self) -> "LocalLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API ----------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/flow_runs/{flow_run_id}")

    def deployment(self, flow_name: str, deployment_name: str) -> dict[str, Any]:
        return self.api("GET", f"/deployments/name/{flow_name}/{deployment_name}")

    def wait_for(self, flow_run_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Poll the flow run until its state type is one of ``states`` (or a final one)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            state = run["state"]["type"] if run.get("state") else None
            if state in states or state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout}s")
            time.sleep(0.2)

    @staticmethod
    def _check(done: subprocess.CompletedProcess) -> None:
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(done.args[1:])} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
