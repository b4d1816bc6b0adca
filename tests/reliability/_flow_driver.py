"""Run the ``vae-training`` flow once in its own process (for the concurrency tests).

    python -m tests.reliability._flow_driver '{"overrides": {...}, "iw_k": 4, ...}'

Prints the flow's result (run id, model version) as one JSON line.
"""

from __future__ import annotations

import json
import sys

import torch

from pipelines.training import vae_training


def main() -> None:
    torch.set_num_threads(1)
    kwargs = json.loads(sys.argv[1])
    out = vae_training(**kwargs)
    print("RESULT " + json.dumps({"run_id": out["run_id"], "model_version": out["model_version"]}))


if __name__ == "__main__":
    main()
