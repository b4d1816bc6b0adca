"""A TCP proxy for fault tests: a real service behind it, network faults injected on demand.

    with FaultProxy("127.0.0.1", 5432) as proxy:    # listens on 127.0.0.1:proxy.port
        ...point the client at proxy.port...
        proxy.cut(3)      # drop every connection; refuse new ones for 3 s (a restart, a link down)
        proxy.freeze()    # accept connections and keep them, but forward nothing (a hung server)
        proxy.resume()    # forward again (ends a cut early, or a freeze)

Threads, one pair per connection; ``cut`` closes the listening socket too, so clients see
"connection refused" exactly as when the server is down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Mapping

__all__ = ["FaultProxy", "free_port", "health_answers", "start_mlflow_server", "stop_process_group"]


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; see the module docstring."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = free_port()
        self.cuts = 0
        self.dropped = 0  # connections closed by cuts: a cut that dropped none tested nothing
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._down_until = 0.0
        self._closed = False
        self._listener: socket.socket | None = None
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cut(self, seconds: float) -> None:
        """Close all connections and refuse new ones for ``seconds`` (then accept again by itself)."""
        with self._lock:
            self.cuts += 1
            self._down_until = time.monotonic() + seconds
            self._drop_all()
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def freeze(self) -> None:
        """Keep accepting and holding connections, but forward no byte either way."""
        self._forwarding.clear()

    def resume(self) -> None:
        """Forward again at once (ends a freeze, or the rest of a cut)."""
        with self._lock:
            self._down_until = 0.0
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        with self._lock:
            self._drop_all()
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.05)
        self._listener = s

    def _drop_all(self) -> None:
        self.dropped += len(self._conns) // 2
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._conns.clear()

    def _accept_loop(self) -> None:
        while not self._closed:
            with self._lock:
                if self._listener is None and time.monotonic() >= self._down_until and not self._closed:
                    self._listen()
                listener, cuts = self._listener, self.cuts
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self.cuts != cuts or self._closed:  # a cut came while it was being accepted: it is dropped too
                    for c in (client, upstream):
                        c.close()
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(None)  # inside: a cut may have closed it before this thread ran
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._forwarding.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the tests' servers and proxies)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_answers(url: str) -> bool:
    """True when ``url/health`` answers (an MLflow server that is up and not frozen)."""
    try:
        urllib.request.urlopen(url + "/health", timeout=2).close()
        return True
    except OSError:
        return False


def start_mlflow_server(root: Path, port: int, env: Mapping[str, str] | None = None,
                        timeout: float = 180) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` (SQLite store and artifacts under ``root``, one
    worker, its own process group, its output in ``root/server.log``), returned once it answers.
    The same ``root`` and ``port`` start it again on the same store (a restart).

    Raises:
        RuntimeError: it exited, or did not answer within ``timeout`` s (then it is stopped);
            the message ends with its log's tail.
    """
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=None if env is None else dict(env), cwd=root, stdout=log, stderr=log,
                                start_new_session=True)
    end = time.monotonic() + timeout
    while not health_answers(f"http://127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() > end:
            stop_process_group(proc)
            raise RuntimeError(f"mlflow server on port {port} did not start (exit code {proc.returncode}): "
                               f"{(root / 'server.log').read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (a server and its workers) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
