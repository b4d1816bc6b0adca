"""What a tracking-server outage costs a pipeline run: training time with and without one.

Starts a real ``mlflow server`` (SQLite, in a temporary folder, a free loopback port) and runs
``python -m pipelines.training`` against it twice: once undisturbed, once with the server
SIGKILLed after the first epoch and started again (same port, same store) ``--outage-s`` later.
Reports, per run: the pipeline's wall time, the training time (first to last epoch, from the
timestamps the epochs' metrics carry), the final MLflow run status, how many values of each epoch
metric the server holds (and whether they are in epoch order), the registered model version, and
the line the flow printed if it ended while the server was away.

    VAE_DATA_DIR=/path/to/data python -m benchmarks.tracking_outage [--outage-s 120] [--num_epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from tests.reliability.faultproxy import free_port, health_answers


def start_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.monotonic() + 180
    while not health_answers(f"http://127.0.0.1:{port}"):
        if time.monotonic() > end or proc.poll() is not None:
            raise RuntimeError("mlflow server did not start")
        time.sleep(0.5)
    return proc


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def epoch_times(ckpt: Path) -> list[float]:
    """The logging time (s) of each epoch's metrics, from the run's outbox."""
    (outbox,) = ckpt.glob("pipeline/*/mlflow-outbox.jsonl")
    out = []
    for line in outbox.read_text().splitlines():
        rec = json.loads(line)
        stamps = [ts for key, _, ts, _ in rec.get("metrics", []) if key == "val/nelbo"]
        out += [s / 1000 for s in stamps]
    return out


def run_pipeline(root: Path, name: str, uri: str, epochs: int, outage=None) -> dict:
    """One pipeline run; ``outage(ckpt)`` runs in a thread beside it."""
    ckpt = root / name
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "pipelines.training", "--preset", "small", "--num_epochs", str(epochs),
           "--checkpoint_dir", str(ckpt), "--experiment_name", name, "--eval_max_images", "500", "--iw_k", "100",
           "--eval_max_train_images", "2000",
           "--progress", "false"]
    helper = threading.Thread(target=outage, args=(ckpt,), daemon=True) if outage else None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if helper:
        helper.start()
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    if helper:
        helper.join()
    times = epoch_times(ckpt)
    pending = [ln for ln in err.splitlines() if ln.startswith(("warning:", "error:"))]
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "train_s": round(times[-1] - times[0], 1),
            "epochs": len(times), "run_id": json.loads(out[out.index("{"):])["run_id"] if "{" in out else None,
            "printed": pending}


def check_run(uri: str, run_id: str) -> dict:
    client = MlflowClient(uri, uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "val/nelbo")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    versions = client.search_model_versions(f"run_id='{run_id}'")
    return {"status": run.info.status, "val_nelbo_steps": steps, "in_order": steps == sorted(steps),
            "model_versions": [v.version for v in versions]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outage-s", type=float, default=120)
    p.add_argument("--num_epochs", type=int, default=8)
    args = p.parse_args(argv)
    root, port = Path(tempfile.mkdtemp(prefix="outage-")), free_port()
    uri = f"http://127.0.0.1:{port}"
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()
    server = [start_server(root, port)]

    def outage(ckpt: Path) -> None:
        while True:  # after the first epoch's metrics
            found = list(ckpt.glob("pipeline/*/mlflow-outbox.jsonl"))
            if found and "val/nelbo" in found[0].read_text():
                break
            time.sleep(0.2)
        kill(server[0])
        time.sleep(args.outage_s)
        server[0] = start_server(root, port)

    report = {}
    for name, fault in (("baseline", None), ("outage", outage)):
        res = run_pipeline(root, name, uri, args.num_epochs, fault)
        time.sleep(2)
        res.update(check_run(uri, res["run_id"]) if res["run_id"] else {})
        report[name] = res
        print(name, json.dumps(res), flush=True)
    kill(server[0])
    print(json.dumps({"outage_s": args.outage_s, **report}, indent=2))


if __name__ == "__main__":
    main()
