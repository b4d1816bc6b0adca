"""What a tracking-server outage costs a pipeline run: training time with and without one.

Starts a real ``mlflow server`` (SQLite, in a temporary folder, a free loopback port) behind the
tests' TCP fault proxy (tests/reliability/faultproxy.py) and runs ``python -m pipelines.training``
against it twice: once undisturbed, once with the server gone from the end of the first epoch for
``--outage-s``. ``--fault cut`` (default): the proxy drops every connection and refuses new ones
(the server unreachable: down, or the network), the server itself idle; ``--fault kill``: the
server SIGKILLed and started again (same port, same store), which on one machine adds its start-up
(~20 CPU-seconds of a fresh ``mlflow server``) to the cores training runs on.
Reports, per run: the pipeline's wall time, the training time (first to last epoch, from the
timestamps the epochs' metrics carry), the median epoch time of the epochs inside the outage and of
the others (for the baseline, the same epochs by number: a VM whose speed drifts shows as both
medians moving together), the final MLflow run status, how many values of each epoch metric the
server holds (and whether they are in epoch order), the registered model version, and the line the
flow printed if it ended while the server was away. By default both runs go at once, one torch
thread each (``--first together``), so a drift of the machine's speed hits both alike; ``--first
baseline|outage`` runs them one after the other with all threads (the first run of a fresh machine
also fills the data and classifier caches).

    VAE_DATA_DIR=/path/to/data python -m benchmarks.tracking_outage [--outage-s 120] [--num_epochs 8]
        [--first outage] [--fault cut|kill]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.reliability.faultproxy import FaultProxy, free_port, start_mlflow_server, stop_process_group
from tracking.outbox import Outbox


def epoch_times(ckpt: Path) -> list[float]:
    """The logging time (s) of each epoch's metrics, from the run's outbox."""
    (outbox,) = ckpt.glob("pipeline/*/mlflow-outbox.jsonl")
    out = []
    for line in outbox.read_text().splitlines():
        rec = json.loads(line)
        stamps = [ts for key, _, ts, _ in rec.get("metrics", []) if key == "val/nelbo"]
        out += [s / 1000 for s in stamps]
    return out


def run_pipeline(root: Path, name: str, uri: str, epochs: int, outage=None, threads: int | None = None) -> dict:
    """One pipeline run; ``outage(ckpt)`` runs in a thread beside it."""
    ckpt = root / name
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
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
            "printed": pending, "epoch_times": times}


def inside(times: list[float], window: tuple[float, float]) -> list[int]:
    """Numbers i of the epochs that ran wholly inside ``window`` (from epoch i-1's metrics to epoch i's)."""
    return [i for i in range(1, len(times)) if times[i - 1] >= window[0] and times[i] <= window[1]]


def epoch_medians(times: list[float], during: list[int]) -> dict:
    """Median epoch time (s) of the epochs numbered in ``during`` and of all the others."""
    steps = {i: times[i] - times[i - 1] for i in range(1, len(times))}
    others = [d for i, d in steps.items() if i not in set(during)]
    return {"epoch_s_during": round(statistics.median([steps[i] for i in during]), 3) if during else None,
            "epoch_s_others": round(statistics.median(others), 3) if others else None}


def check_run(uri: str, run_id: str) -> dict:
    client = MlflowClient(uri, uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "val/nelbo")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    versions = client.search_model_versions(f"run_id='{run_id}'")
    return {"status": run.info.status, "val_nelbo_steps": steps, "in_order": steps == sorted(steps),
            "model_versions": [v.version for v in versions]}


def run_both(root: Path, uri: str, direct: str, epochs: int, outage, first: str) -> dict[str, dict]:
    """The baseline and the outage run (``first``: which goes first, or ``together``: at once, one
    thread each, the baseline talking to the server directly, the outage run through the proxy),
    each with its MLflow run's state afterwards."""
    report: dict[str, dict] = {}
    runs = [("baseline", None), ("outage", outage)]
    if first == "together":
        both = [threading.Thread(target=lambda n=n, f=f: report.__setitem__(n, run_pipeline(
            root, n, uri if f else direct, epochs, f, threads=1))) for n, f in runs]
        for t in both:
            t.start()
        for t in both:
            t.join()
    else:
        for name, fault in runs if first == "baseline" else runs[::-1]:
            report[name] = run_pipeline(root, name, uri, epochs, fault)
    time.sleep(2)
    for res in report.values():
        res.update(check_run(uri, res["run_id"]) if res["run_id"] else {})
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outage-s", type=float, default=120)
    p.add_argument("--num_epochs", type=int, default=8)
    p.add_argument("--first", choices=("baseline", "outage", "together"), default="together",
                   help="which run goes first; together (default): both at once, one thread each, so both see the "
                        "same machine (a shared VM's speed drifts by more than 5%% between runs minutes apart)")
    p.add_argument("--fault", choices=("cut", "kill"), default="cut",
                   help="cut: the proxy refuses connections; kill: the server is killed and restarted")
    args = p.parse_args(argv)
    root, port = Path(tempfile.mkdtemp(prefix="outage-")), free_port()
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()
    server = [start_mlflow_server(root, port)]
    proxy = FaultProxy("127.0.0.1", port)
    uri = f"http://127.0.0.1:{proxy.port}"
    window: list[float] = []
    held: list[int] = []

    def outage(ckpt: Path) -> None:
        while True:  # after the first epoch's metrics
            found = list(ckpt.glob("pipeline/*/mlflow-outbox.jsonl"))
            if found and "val/nelbo" in found[0].read_text():
                break
            time.sleep(0.2)
        window.append(time.time())
        if args.fault == "cut":
            proxy.cut(args.outage_s)  # accepts again by itself afterwards
        else:
            stop_process_group(server[0])
        time.sleep(args.outage_s / 2)  # halfway: what the outbox holds back shows the outage is real
        held.append(len(Outbox(found[0].parent, found[0].parent.name).pending()))
        time.sleep(args.outage_s / 2)
        if args.fault == "kill":
            server[0] = start_mlflow_server(root, port)
        window.append(time.time())  # answering again

    report = run_both(root, uri, f"http://127.0.0.1:{port}", args.num_epochs, outage, args.first)
    during = inside(report["outage"]["epoch_times"], tuple(window))
    for name, res in report.items():
        res.update(epoch_medians(res.pop("epoch_times"), during))
        steps = res.pop("val_nelbo_steps", [])
        res["val_nelbo_steps"] = f"{len(steps)} values, steps {steps[0]}-{steps[-1]}" if steps else "none"
    proxy.close()
    stop_process_group(server[0])
    print(json.dumps({"outage_s": args.outage_s, "fault": args.fault, "first": args.first,
                      "outage_epochs": f"{during[0]}-{during[-1]}" if during else "none",
                      "records_held_halfway": held[0] if held else None, **report}, indent=2))


if __name__ == "__main__":
    main()
