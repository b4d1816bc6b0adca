"""Fixtures of the scale-out tests: a private stack started with
``scripts/stack.sh`` on the machine's PostgreSQL (``postgres``, tests/conftest.py): own folder, free
ports, uniquely named databases, all dropped afterwards."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.reliability.faultproxy import free_port

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "scripts" / "stack.sh"


@dataclass
class Stack:
    """A running stack: its folder, environment for ``scripts/stack.sh`` and the service URLs."""

    dir: Path
    env: dict[str, str]
    prefix: str

    def sh(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(STACK_SH), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"stack.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def client_env(self) -> dict[str, str]:
        """The environment `source .stack/env` gives a client, on top of this process's."""
        env = dict(os.environ)
        for line in (self.dir / "env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                env[key] = value
        return env

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.env['STACK_MLFLOW_PORT']}"

    @property
    def optuna_url(self) -> str:
        return f"{self.env['STACK_PG']}/{self.prefix}_optuna"


def start_stack(tmp: Path, postgres: str, *args: str, env: dict[str, str] | None = None) -> Stack:
    """``scripts/stack.sh up ARGS`` in ``tmp/stack`` (extra ``env`` reaches the servers and workers)."""
    prefix = f"vae_t{os.getpid()}_{secrets.token_hex(3)}"
    env = {**os.environ, **(env or {}), "STACK_DIR": str(tmp / "stack"), "STACK_PG": postgres,
           "STACK_DB_PREFIX": prefix, "STACK_MLFLOW_PORT": str(free_port()),
           "STACK_PREFECT_PORT": str(free_port()), "PY": sys.executable}
    stack = Stack(tmp / "stack", env, prefix)
    try:
        stack.sh("up", *args)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    """Stop the stack's processes, drop its databases and remove its folder (idempotent)."""
    stack.sh("down", "--purge", check=False)


@pytest.fixture(scope="module")
def mlflow_stack(tmp_path_factory, postgres):
    """PostgreSQL databases and an MLflow server on them (no Prefect): the sweep's services."""
    stack = start_stack(tmp_path_factory.mktemp("mlflow-stack"), postgres, "--no-prefect")
    try:
        yield stack
    finally:
        stop_stack(stack)
