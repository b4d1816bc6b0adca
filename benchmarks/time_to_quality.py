"""The time-to-quality figure: test IW bound against training minutes, one line per quality run.

Each argument is a ``results.json`` of ``benchmarks/quality.py`` (its ``curve``: the best model
by validation every ``--snapshot_minutes``, scored afterwards on the first test images).

    python -m benchmarks.time_to_quality runs/conv/results.json runs/record/results.json --out time_to_quality.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vae.figures import plot_time_to_quality  # noqa: E402


def run_label(results: dict) -> str:
    """'autoregressive decoder, 1 thread', '... z removed', '... bf16 autocast': what tells the runs apart."""
    cfg = results["config"]
    label = f"{cfg['decoder']} decoder" + ("" if cfg.get("use_latent", True) else ", z removed") \
        + (", bf16 autocast" if cfg.get("amp") else "")
    threads = results.get("train_threads")
    return label + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of benchmarks/quality.py")
    p.add_argument("--labels", nargs="*", default=None, help="one legend label per results file")
    p.add_argument("--out", default="time_to_quality.png", help="the PNG to write")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.results):
        p.error(f"--labels: {len(args.labels)} label(s) for {len(args.results)} results file(s)")
    curves = {}
    for i, path in enumerate(args.results):
        try:
            results = json.loads(Path(path).read_text())
            rows = results["curve"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{path}: not a results.json of benchmarks/quality.py ({type(e).__name__}: {e})")
        curves[args.labels[i] if args.labels else run_label(results)] = rows
        for row in rows:
            print(f"{path}: {row['minutes']:6.1f} min  {row['iw_nll']:.2f} ± {row['iw_nll_se']:.2f} nats")
    print(f"wrote {plot_time_to_quality(curves, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
