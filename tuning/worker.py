"""A sweep worker process: ``python -m tuning.worker`` as started by :func:`tuning.sweep.run_sweep`.

It loads the existing study and runs trials until the study holds ``n_trials`` finished ones, attaching each trial's MLflow run
to the parent run given by id. Not meant to be started by hand: ``python -m tuning --n-workers W``
starts W of them; more workers on another machine are more ``python -m tuning`` invocations
against the same ``--storage``.
"""

from __future__ import annotations

import argparse
import sys

from tuning.objective import SweepInterrupted
from tuning.options import SweepOptions
from tuning.sweep import run_worker
from vae.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.worker")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--max-trials", type=int, default=None, help="this worker's share of the trials")
    parser.add_argument("--exp-id", required=True)
    parser.add_argument("--parent-run-id", required=True)
    parser.add_argument("--options", required=True, help="SweepOptions as JSON")
    args = parser.parse_args(argv)
    opts = SweepOptions.from_json(args.options)
    try:
        run_worker(opts, worker=args.worker, exp_id=args.exp_id, parent_run_id=args.parent_run_id,
                   prefix=f"[worker {args.worker}] ", max_trials=args.max_trials)
    except SweepInterrupted:
        return 130
    except UserError as e:  # the storage stayed down: one line, as from python -m tuning
        print(f"[worker {args.worker}] error: " + " ".join(e.message().split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
