"""The pipeline's overhead over the bare trainer, for the same config and epochs.

Runs, interleaved ``--repeats`` times (the CPU is shared: interleaving spreads the noise over
both), the bare ``VAETrainer(config, data=data).train()`` (data already in memory) and the
``vae-training`` flow with the same config (its data task cached by a warm-up run), and reports:

- ``train task``: the flow's train task (trainer + per-epoch MLflow logging + checkpoint
  artifacts + cached data load) against the bare trainer: the overhead on the same work;
- ``flow - eval``: the whole flow minus its evaluate, figures and register tasks (the extra work
  the bare trainer does not do): orchestration, tracking, data verification and caching.

    python -m benchmarks.pipeline_overhead [--preset default] [--epochs 1] [--repeats 2] [--max-train-samples 0]

Data from $VAE_DATA_DIR; MLflow, Prefect and checkpoints go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def task_seconds(flow_run_id: str) -> dict[str, float]:
    """Wall seconds of each task run of a flow run, by task name, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: (r.end_time - r.start_time).total_seconds() for r in runs
            if r.start_time and r.end_time}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="config preset (default: the seed's default config)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=0, help="0 = all 60,000 training images")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="pipeline-overhead-"))
    os.environ.setdefault("VAE_MLRUNS_DIR", str(tmp / "mlruns"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    from pipelines.training import vae_training
    from vae.config import PRESETS
    from vae.data import load_dataset
    from vae.train import VAETrainer

    base = {**PRESETS[args.preset](), "num_epochs": args.epochs, "progress": False, "sample_every": 0,
            "max_train_samples": args.max_train_samples, "experiment_name": "overhead"}
    vae_training(overrides={**base, "checkpoint_dir": str(tmp / "warmup"), "num_epochs": 1, "max_train_samples": 6000,
                            "val_size": 1000}, iw_k=1, eval_max_images=100, eval_probe=False, eval_fid=False,
                 figures=False, register_model=False)  # warm-up: Prefect server, imports, the data cache
    data = load_dataset(base["data_dir"], base["dataset"])  # both sides start from loaded data
    rows = []
    for i in range(args.repeats):
        t = time.perf_counter()
        VAETrainer({**base, "checkpoint_dir": str(tmp / f"bare{i}")}, data=data).train()
        bare = time.perf_counter() - t
        t = time.perf_counter()
        state = vae_training(overrides={**base, "checkpoint_dir": str(tmp / f"flow{i}")}, iw_k=1, eval_max_images=1000,
                             eval_probe=False, eval_fid=False, return_state=True)
        flow = time.perf_counter() - t
        tasks = task_seconds(str(state.state_details.flow_run_id))
        extra = sum(tasks.get(k, 0.0) for k in ("evaluate", "figures", "register"))
        row = {"bare": bare, "train_task": tasks["train"], "flow": flow, "flow_minus_eval": flow - extra}
        rows.append(row)
        print(f"pair {i + 1}: bare {bare:.1f} s | train task {row['train_task']:.1f} s "
              f"({100 * (row['train_task'] / bare - 1):+.1f}%) | flow {flow:.1f} s, without evaluate/figures/register "
              f"{row['flow_minus_eval']:.1f} s ({100 * (row['flow_minus_eval'] / bare - 1):+.1f}%)", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {len(rows)} ({args.preset}, {args.epochs} epoch(s), max_train_samples {args.max_train_samples}): "
          f"bare {med['bare']:.1f} s; train task {100 * (med['train_task'] / med['bare'] - 1):+.1f}%; "
          f"flow without evaluation {100 * (med['flow_minus_eval'] / med['bare'] - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
