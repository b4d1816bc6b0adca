"""Load on the served model: requests/s, images/s and p50/p99 latency of ``mlflow models serve``.

Registers a model of the ``small`` preset's architecture (trained one short epoch on the test
suite's tiny data: speed does not depend on the weights) in a temporary store, starts the scoring
server on a free 127.0.0.1 port as ``make serve`` does, and sends, from one client over one
keep-alive connection, at most ``--requests`` requests or ``--seconds`` seconds (whichever ends
first) per case: reconstructions and anomaly scores at batch 1 and batch 256. Beside each it
measures the same ``predict`` in this process and the client's JSON encode + decode, so what HTTP
and JSON cost is the difference. The server is stopped at the end.

    python -m benchmarks.serve [--requests 300] [--seconds 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

import tracking
from pipelines import registry
from vae.config import PRESETS, validate_config
from vae.train import VAETrainer

# (output, batch, encoding): "float" = nested JSON lists; "uint8_b64" = base64 of uint8 bytes both ways.
CASES = [("reconstruction", 1, "float"), ("reconstruction", 256, "float"), ("reconstruction", 256, "uint8_b64"),
         ("anomaly_score", 1, "float"), ("anomaly_score", 256, "float"), ("anomaly_score", 256, "uint8_b64")]


def register_small(root: Path) -> str:
    """A small-preset model registered as champion in a store under ``root`` (``$VAE_MLRUNS_DIR``
    from now on, so the server finds it); returns its URI."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import write_idx_dataset  # the test suite's tiny IDX writer

    data = write_idx_dataset(root / "data")
    # After that import: tests/conftest.py clears VAE_MLRUNS_DIR and MLFLOW_TRACKING_URI when imported.
    os.environ.update(VAE_MLRUNS_DIR=str(root / "mlruns"), VAE_CACHE_DIR=str(root / "cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = {**PRESETS["small"](), "data_dir": str(data), "checkpoint_dir": str(root / "ck"), "num_epochs": 1,
           "val_size": 100, "progress": False, "sample_every": 0, "experiment_name": "serve-bench"}
    checkpoint = VAETrainer(validate_config(cfg), []).train()["best_model_path"]
    client = tracking.get_client()
    run_id = client.create_run(tracking.ensure_experiment(client, "serve-bench")).info.run_id
    registry.log_and_register(client, run_id, checkpoint, cfg, alias=tracking.CHAMPION)
    return f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION}"


def start_server(uri: str, workers: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the scoring server did not answer /ping in 2 minutes")


def _request(images: np.ndarray, output: str, encoding: str) -> tuple[np.ndarray, dict]:
    """The ``inputs`` and ``params`` of one request (the base64 form sends one blank image as inputs)."""
    if encoding == "float":
        return images, {"output": output}
    raw = base64.b64encode(np.rint(images * 255).astype(np.uint8).tobytes()).decode("ascii")
    return np.zeros((1, 1, 28, 28), np.float32), {"output": output, "encoding": encoding, "images_b64": raw}


def run_case(port: int, model, output: str, batch: int, encoding: str, requests: int,
             seconds: float) -> dict[str, float]:
    images = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
    inputs, params = _request(images, output, encoding)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, codec = [], []
    start = time.perf_counter()
    while len(latencies) < requests and time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        body = json.dumps({"inputs": inputs.tolist(), "params": params})
        t1 = time.perf_counter()
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        t2 = time.perf_counter()
        json.loads(raw)
        t3 = time.perf_counter()
        if response.status != 200:
            raise RuntimeError(f"{output} batch {batch}: HTTP {response.status}: {raw[:300]!r}")
        latencies.append(t3 - t0)
        codec.append((t1 - t0) + (t3 - t2))
    wall = time.perf_counter() - start
    local = []
    for _ in range(min(len(latencies), 30)):
        t0 = time.perf_counter()
        model.predict(inputs, params=params)
        local.append(time.perf_counter() - t0)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"output": output, "batch": batch, "encoding": encoding, "requests": len(latencies),
            "req_s": len(latencies) / wall,
            "img_s": batch * len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * q[98], "predict_ms": 1000 * statistics.median(local),
            "client_json_ms": 1000 * statistics.median(codec)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=300, help="at most this many requests per case")
    p.add_argument("--seconds", type=float, default=20, help="at most this long per case")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    uri = register_small(root)
    model = registry.load_pyfunc(uri)
    proc, port = start_server(uri, args.workers)
    try:
        rows = [run_case(port, model, *case, args.requests, args.seconds) for case in CASES]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nmlflow models serve, {args.workers} worker(s), small preset (conv decoder), one client, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| output | batch | images as | requests | req/s | images/s | p50 ms | p99 ms | in-process predict p50 ms | "
          "client JSON encode+decode ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['output']} | {r['batch']} | {r['encoding']} | {r['requests']} | {r['req_s']:.1f} | "
              f"{r['img_s']:,.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['predict_ms']:.1f} | {r['client_json_ms']:.1f} |")


if __name__ == "__main__":
    main()
