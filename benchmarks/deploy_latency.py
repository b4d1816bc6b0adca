"""Time from ``prefect deployment run`` to a running flow, on the local loop.

Starts a Prefect server on a free loopback port, the ``vae-pool`` process pool, the ``vae-train``
deployment from prefect.yaml and one worker (all under a temporary PREFECT_HOME, all stopped at
the end), then runs the deployment ``--runs`` times with a tiny config and reports, per run:
the CLI's own time, the time until the flow run is RUNNING (worker poll + process start + imports)
and until it is COMPLETED.

    python -m benchmarks.deploy_latency [--runs 3] [--query-seconds 10]

``--query-seconds`` is the worker's poll interval (PREFECT_WORKER_QUERY_SECONDS, Prefect's
default 10): the wait is at most one interval plus the start-up.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipelines.local_loop import LocalLoop

TINY = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "val_size": 100, "max_train_samples": 0,
        "progress": False, "experiment_name": "deploy-latency"}


def tiny_dataset(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import write_idx_dataset  # the test suite's tiny IDX writer

    return write_idx_dataset(root)


def measure(runs: int, query_seconds: float) -> list[dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    data = tiny_dataset(tmp / "data")
    env = {"VAE_MLRUNS_DIR": str(tmp / "mlruns"), "VAE_CACHE_DIR": str(tmp / "cache"),
           "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)}
    params = {"overrides": {**TINY, "data_dir": str(data), "checkpoint_dir": str(tmp / "checkpoints")}, "iw_k": 8,
              "eval_max_images": 100, "eval_probe": False, "eval_fid": False, "figures": False}
    out = []
    with LocalLoop(tmp / "prefect", env) as loop:
        t = time.perf_counter()
        loop.start_server()
        loop.create_pool()
        loop.deploy("vae-train")
        loop.start_worker()
        print(f"loop up in {time.perf_counter() - t:.1f} s (server, pool, deploy, worker)", flush=True)
        for i in range(runs):
            t0 = time.perf_counter()
            done = loop.cli("deployment", "run", "vae-training/vae-train", "--param", "num_epochs=1",
                            "--params", json.dumps(params))
            cli_s = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(done.stdout + done.stderr)
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
            loop.wait_for(flow_run_id, ("RUNNING",), timeout=600)
            running_s = time.perf_counter() - t0
            final = loop.wait_for(flow_run_id, ("COMPLETED",), timeout=600)
            row = {"cli_s": cli_s, "running_s": running_s, "completed_s": time.perf_counter() - t0}
            print(f"run {i + 1}: CLI {cli_s:.1f} s, RUNNING after {running_s:.1f} s, "
                  f"{final['state']['type']} after {row['completed_s']:.1f} s", flush=True)
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--query-seconds", type=float, default=10.0, help="worker poll interval (Prefect default 10)")
    args = p.parse_args(argv)
    rows = measure(args.runs, args.query_seconds)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {len(rows)}: CLI {med['cli_s']:.1f} s, deployment run -> RUNNING {med['running_s']:.1f} s, "
          f"-> COMPLETED {med['completed_s']:.1f} s (worker poll interval {args.query_seconds:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
