"""Servers started by the project's commands listen on 127.0.0.1 unless the user asks otherwise."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import ROOT, wait_for

SERVER_COMMAND = re.compile(r"(mlflow\"? (ui|server)|prefect\"? server start|optuna-dashboard )")


def _server_lines(path: Path) -> list[str]:
    """Lines of ``path`` that start a server, with backslash continuations joined."""
    text = path.read_text()
    if path.suffix == ".md":  # commands only: the fenced code blocks
        text = "\n".join(block for i, block in enumerate(text.split("```")) if i % 2 == 1)
    text = text.replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if SERVER_COMMAND.search(ln) and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Makefile", "scripts/stack.sh", "README.md",
                                  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_every_server_command_binds_loopback(name):
    path = ROOT / name
    if not path.is_file():
        pytest.skip(f"{name} is not there")
    lines = [ln for ln in _server_lines(path) if "--help" not in ln]
    for line in lines:
        host = re.search(r"--host[ =]\"?([^\s\"]+)", line)
        assert host, f"{name}: starts a server without --host (defaults may be public): {line}"
        assert host.group(1) in ("127.0.0.1", "$STACK_HOST", "localhost"), f"{name}: {line}"
    if name == "scripts/stack.sh":
        assert re.search(r"^STACK_HOST=\$\{STACK_HOST:-127\.0\.0\.1\}", path.read_text(), re.M)


def _listening(port: int) -> set[str]:
    """Local addresses (IPv4 and IPv6, hex as in /proc) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


@pytest.mark.slow
def test_make_ui_serves_mlflow_on_loopback_only(procs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The exact command `make ui` runs (dry run: nothing installed or started by make itself).
    dry = subprocess.run(["make", "-n", "ui", f"MLFLOW_PORT={port}", "PY=" + str(ROOT / ".venv/bin/python")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    (command,) = [ln for ln in dry.stdout.replace("\\\n", " ").splitlines() if "mlflow ui" in ln]
    env = {**procs.env, "VAE_MLRUNS_DIR": str(tmp_path / "mlruns")}
    proc = procs.start(["bash", "-c", command], env=env, cwd=ROOT)
    assert wait_for(lambda: _listening(port), timeout=120, interval=0.5, proc=proc), proc.communicate()[1][-2000:]
    addresses = _listening(port)
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert addresses <= loopback, f"port {port} is open on {addresses}, not only on loopback"
