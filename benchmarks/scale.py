"""Scale-out: wall time of one fixed sweep run by 1, 2 and 4 worker processes on one study.

Each row runs ``python -m tuning --n-trials 8 --n-workers W --threads 1`` as a user would: a fresh
study in the Optuna storage (by default a fresh PostgreSQL database on 127.0.0.1:5432, dropped
afterwards; a journal file when PostgreSQL does not answer), trials logged to MLflow
(``$MLFLOW_TRACKING_URI`` — e.g. the stack's server after ``source .stack/env`` — else a fresh
SQLite store). The workload is fixed: the ``small`` preset with ``latent_dim`` fixed, so only β and
the learning rate vary and every trial costs the same; no pruning. One torch thread per worker,
so W workers want W cores.

Two times per row: ``wall`` (the whole command: imports, study creation, worker start-up, trials,
plots, summary) and ``trials`` (the sweep's own ``done: ... s`` figure, from study creation to the
last trial). Speed-up = time with 1 worker / time with W workers. ``CPU s`` adds up the user and system time of
the sweep and all its workers: what parallelism costs in start-up (imports, data) per worker.
Trials are sized (about 12 CPU-seconds each) so that the trials, not the start-up, dominate.

    python -m benchmarks.scale                                   # 8 trials x 1, 2, 4 workers
    python -m benchmarks.scale --workers 1 2 --epochs 1 --train-samples 1024   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get("VAE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _pg(database: str = "postgres"):
    import psycopg

    return psycopg.connect(PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/" + database,
                           autocommit=True, connect_timeout=3)


def _pg_answers() -> bool:
    try:
        with _pg() as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - no server: fall back to a journal file
        return False


def _data_dir() -> str:
    for candidate in (os.environ.get("VAE_DATA_DIR"), REPO / "data", REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return str(Path(candidate).resolve())
    sys.exit("benchmarks.scale: MNIST not found: set VAE_DATA_DIR to a folder holding MNIST/raw")


def sweep_command(args, study: str, storage: str, workers: int) -> list[str]:
    fixed = {"data_dir": _data_dir(), "latent_dim": 16, "num_epochs": args.epochs, "val_size": args.val_size,
             "max_train_samples": args.train_samples + args.val_size, "batch_size": 128}
    cmd = [sys.executable, "-m", "tuning", "--study-name", study, "--storage", storage, "--preset", "small",
           "--n-trials", str(args.trials), "--n-workers", str(workers), "--threads", "1", "--pruner", "none",
           "--sampler", "random", "--seed", "0"]
    for key, value in fixed.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def run_one(args, workers: int, tmp: Path) -> dict:
    """One sweep with ``workers`` processes in a fresh study; returns its times."""
    token = secrets.token_hex(3)
    study = f"scale-bench-w{workers}-{token}"
    db = None
    if args.storage:
        storage = args.storage
    elif _pg_answers():
        db = f"vae_bench_{os.getpid()}_{token}"
        with _pg() as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        storage = f"{PG_SERVER}/{db}"
    else:
        storage = f"journal:{tmp / study}.log"
    env = {**os.environ, "VAE_OPTUNA_DIR": str(tmp / "optuna"), "VAE_MLRUNS_DIR": str(tmp / "mlruns"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(sweep_command(args, study, storage, workers), env=env, cwd=tmp,
                              capture_output=True, text=True)
    finally:
        if db:
            with _pg() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the sweep and its workers, once reaped
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"sweep with {workers} worker(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    done = re.search(r"^done: (\d+) trial\(s\) \((\d+) complete.*?([\d.]+) s;", proc.stdout, re.M)
    return {"workers": workers, "wall_s": round(wall, 2), "trials_s": float(done.group(3)),
            "complete": int(done.group(2)), "cpu_s": round(cpu, 1), "load_before": round(load, 2),
            "storage": "postgresql" if db or storage.startswith("postgresql") else storage.split(":")[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (default 8)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--train-samples", type=int, default=8192, help="training images per trial (default 8192)")
    p.add_argument("--val-size", type=int, default=1000, help="validation images per trial (default 1000)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: a fresh PostgreSQL database)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    print(f"{args.trials} trials x {args.epochs} epoch(s) x {args.train_samples} images, preset small, "
          f"1 torch thread per worker; {os.cpu_count()} CPU(s); MLflow: "
          f"{os.environ.get('MLFLOW_TRACKING_URI') or 'fresh SQLite store'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-scale-bench-") as tmp:
        for workers in args.workers:
            rows.append(run_one(args, workers, Path(tmp)))
            print(f"  {workers} worker(s): {rows[-1]}", flush=True)
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    print("\n| workers | wall s | speed-up | trials s | speed-up | CPU s (all processes) | load avg before |")
    print("|--------:|-------:|---------:|---------:|---------:|----------------------:|----------------:|")
    for r in rows:
        print(f"| {r['workers']} | {r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | {r['trials_s']:.1f} | "
              f"{base['trials_s'] / r['trials_s']:.2f}x | {r['cpu_s']:.1f} | {r['load_before']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
