"""How long the first training steps take, and what the process does before step 1.

A user saw the first 10-50 batches of ``make demo`` run at ~1.2 s each, then 8-58 batches/s.
This times each of the first ``--steps`` training steps of a fresh process, for each variant, and
prints the median over ``--rounds`` of: the startup (process launch to the first batch), and the
step times of steps 1-5, 6-20 and 21-N.

Variants (each a fresh ``python`` process, run interleaved round by round so that load from other
jobs on a shared machine spreads over all of them):

- ``train``: ``vae.train --preset small`` (the CLI, fast path on);
- ``train-nofast`` / ``train-noretain``: the same with ``--fast false`` / ``--retain_memory false``;
- ``train-1thread``: the same with ``OMP_NUM_THREADS=1``;
- ``flow``: the ``vae-training`` flow (``pipelines.training``) on the small preset, with Prefect's
  ephemeral API server started inside the process (``PREFECT_API_URL`` unset, as in ``make demo``);
- ``flow-server``: the same flow talking to an already running ``prefect server`` (``--server``).

A step is the time between two batches handed to the training loop (``ImageBatches.iter_from``
is wrapped in the child process): forward, backward, optimiser, EMA. Runs stop after ``--steps``
steps (config ``fast_dev_run``); the flow skips the probe, FID, figures and registration.

    .venv/bin/python -m benchmarks.first_steps [--rounds 3] [--steps 60] [--variants train flow] [--server]

Data from $VAE_DATA_DIR; MLflow, Prefect and checkpoints go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_VARIANTS = {"train": [], "train-nofast": ["--fast", "false"], "train-noretain": ["--retain_memory", "false"],
                  "train-1thread": []}
VARIANTS = [*TRAIN_VARIANTS, "flow", "flow-server"]
BANDS = ((1, 5), (6, 20), (21, None))


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used, from /proc (0 for a gone one)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all cores of the machine have been busy since boot (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Prefect's ephemeral server, for the flow)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def _record_batches(stamps: list[tuple[float, float, float, float]]) -> None:
    """Wrap ``ImageBatches.iter_from``: when each training batch is handed out (monotonic time), with
    this process's CPU seconds, its child processes' and the whole machine's busy CPU seconds."""
    from vae.data import ImageBatches

    original = ImageBatches.iter_from
    children: list[int] = []

    def stamp():
        if not stamps:
            children.extend(_children(os.getpid()))
        stamps.append((time.monotonic(), time.process_time(), _cpu_seconds(children), _busy_seconds()))

    def iter_from(self, start=0):
        for batch in original(self, start):
            if self.shuffle:  # training batches; validation iterates unshuffled
                stamp()
            yield batch
        if self.shuffle:
            stamp()  # the end of the last step

    ImageBatches.iter_from = iter_from


def child(variant: str, steps: int, out: Path) -> None:
    """Run one variant in this process and write the batch times to ``out``."""
    stamps: list[tuple[float, float, float, float]] = []
    _record_batches(stamps)
    common = ["--preset", "small", "--fast_dev_run", str(steps), "--progress", "false", "--sample_every", "0"]
    if variant in TRAIN_VARIANTS:
        from vae.train import _main as train_main

        train_main([*common, "--overwrite", *TRAIN_VARIANTS[variant]])
    else:
        from pipelines.training import vae_training

        vae_training(preset="small", overrides={"fast_dev_run": steps, "progress": False, "sample_every": 0},
                     iw_k=1, eval_max_images=100, eval_probe=False, eval_fid=False, figures=False,
                     register_model=False)
    out.write_text(json.dumps(stamps[:steps + 1]))


def _launch(variant: str, steps: int, tmp: Path, server_url: str | None) -> dict:
    """Run a variant in a fresh process: startup and step seconds; cores busy during steps 1-20 (own
    process, its child processes, everything else on the machine)."""
    env = {**os.environ, "VAE_MLRUNS_DIR": str(tmp / "mlruns"), "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 20 s is too short on a busy machine
    if variant == "train-1thread":
        env["OMP_NUM_THREADS"] = "1"
    if variant == "flow-server":
        env["PREFECT_API_URL"] = server_url
    out = tmp / f"{variant}.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.first_steps", "--child", variant, "--steps", str(steps),
                           "--out", str(out)], cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    stamps = json.loads(out.read_text())
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    first, last = stamps[0], stamps[min(20, len(stamps) - 1)]  # CPU shares over steps 1-20
    wall, own, server, busy = (b - a for a, b in zip(first, last))
    return {"startup": first[0] - t0, "steps": steps, "own": own / wall, "server": server / wall,
            "others": max(busy - own - server, 0.0) / wall}


def _start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A ``prefect server`` on a free port, ready to serve."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the Prefect server did not start within 2 minutes")


def _row(variant: str, runs: list[dict]) -> str:
    med = statistics.median
    cells = [f"{med(r['startup'] for r in runs):.1f}"]
    for lo, hi in BANDS:
        cells.append(f"{1000 * med(med(r['steps'][lo - 1:hi]) for r in runs):.0f}")
    cells += [f"{med(r[k] for r in runs):.2f}" for k in ("own", "server", "others")]
    return f"| {variant} | " + " | ".join(cells) + f" | {len(runs)} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["train", "train-nofast", "flow"])
    p.add_argument("--server", action="store_true", help="also run flow-server (starts a Prefect server first)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.out)
        return 0
    variants = [*args.variants, *(["flow-server"] if args.server and "flow-server" not in args.variants else [])]
    tmp = Path(tempfile.mkdtemp(prefix="first-steps-"))
    server, url = _start_server(tmp) if "flow-server" in variants else (None, None)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                runs[v].append(_launch(v, args.steps, tmp, url))
                run = runs[v][-1]
                print(f"round {r + 1} {v}: startup {run['startup']:.1f} s, steps 1-20 (ms) "
                      + " ".join(f"{1000 * s:.0f}" for s in run["steps"][:20])
                      + f"; cores busy: own {run['own']:.2f} server {run['server']:.2f} others {run['others']:.2f}",
                      file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(f"\nmedians over {args.rounds} rounds: startup (launch to first batch) in s, median step in ms, and the\n"
          "cores busy during steps 1-20 in this process, its child processes (Prefect's server) and the rest\n")
    print(f"| variant | startup s | steps 1-5 | 6-20 | 21-{args.steps} | own | server | others | runs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        print(_row(v, runs[v]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
