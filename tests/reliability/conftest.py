"""Fixtures for the reliability suite: real subprocesses (always reaped), CLI flags, a tally.

Every process a test starts goes through :class:`Procs`, which starts it in its own process
group and kills the group when the test ends, whatever happened. Subprocesses run with one
torch thread: on a shared 2-core machine that is several times faster than the default.

The tally counts what the suite did (faults injected, bad inputs tried, runs and trials
checked afterwards, lost); it is printed at the end of a run and written as JSON to
``$VAE_RELIABILITY_COUNTS`` when that is set (the figures in BENCHMARKS.md come from it).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# A flow run's evaluation in seconds: the IW bound with k = 4 on 50 test images, no probe, no FID.
FAST_EVAL = {"iw_k": 4, "eval_max_images": 50, "eval_probe": False, "eval_fid": False}
# A flow run's model and training in seconds on the tiny dataset.
TINY_FLOW = {"hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "num_epochs": 2, "val_size": 100,
             "progress": False, "sample_every": 0, "ema_decay": 0.9, "log_every": 1}
TALLY: collections.Counter = collections.Counter()


def tally(kind: str, n: int = 1) -> None:
    """Count ``n`` of ``kind``: faults, bad_inputs, runs_checked, trials_checked, lost."""
    TALLY[kind] += n


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if TALLY:
        terminalreporter.write_line("reliability tally: " + ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items())))
        out = os.environ.get("VAE_RELIABILITY_COUNTS")
        if out:
            Path(out).write_text(json.dumps(dict(TALLY), indent=2, sort_keys=True))


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a project CLI: one torch thread, the checkout importable, own cache (with
    the session's compiled fast-path kernel in it, so that no CLI compiles it again)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAE_FAST_DEV_RUN", "MLFLOW_TRACKING_URI"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               VAE_CACHE_DIR=str(tmp_path / "cache"), DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    env.update(extra)
    _seed_kernels(Path(env["VAE_CACHE_DIR"]) / "kernels")
    return env


def _seed_kernels(folder: Path) -> None:
    """Copy the session's built kernels (``vae.fast.bn_act``; named by source, flags and CPU) into
    ``folder``: compiling one takes a CLI a second or two of CPU."""
    from vae import settings
    from vae.fast import bn_act

    if bn_act.library() is None:  # no compiler: every CLI finds none either
        return
    folder.mkdir(parents=True, exist_ok=True)
    for built in (settings.current().cache_dir / "kernels").glob("*.so"):
        if not (folder / built.name).exists():
            shutil.copy2(built, folder / built.name)


def cli_flags(cfg: Mapping[str, Any]) -> list[str]:
    """``{'latent_dim': 4, 'hidden_dims': [8, 16]}`` -> ``['--latent_dim', '4', '--hidden_dims', '8', '16']``."""
    out: list[str] = []
    for key, value in cfg.items():
        out.append(f"--{key}")
        out.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else out.append(str(value))
    return out


class Procs:
    """Starts subprocesses in their own process groups; :meth:`reap` kills whatever is left."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env, self.cwd = env, cwd
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("env", self.env)
        kwargs.setdefault("cwd", self.cwd)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def run(self, args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run to completion; returns (args, returncode, stdout, stderr)."""
        proc = self.start(args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            pytest.fail(f"{args[:4]} did not finish in {timeout} s\nstdout:{out}\nstderr:{err[-3000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def python(self, *args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run([PYTHON, *args], timeout=timeout, **kwargs)

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.kill(proc)
            try:
                proc.communicate(timeout=30)
            except (subprocess.TimeoutExpired, ValueError):
                pass


@pytest.fixture
def procs(tmp_path):
    """A :class:`Procs` whose processes run in ``tmp_path`` with :func:`cli_env`; all reaped after."""
    p = Procs(cli_env(tmp_path), tmp_path)
    try:
        yield p
    finally:
        p.reap()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process training with one thread: faster here, and comparable with the subprocesses."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_for(predicate, timeout: float, interval: float = 0.02, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``predicate`` until true (returns True) or ``timeout`` / ``proc`` exiting (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def start_pipeline(procs: Procs, module: str, args: list[str], **env: str) -> subprocess.Popen:
    """The pipeline command ``python -m module args`` on this session's Prefect server, with ``env``
    added (``VAE_MLRUNS_DIR`` or ``MLFLOW_TRACKING_URI``: where it tracks)."""
    from prefect.settings import PREFECT_API_URL

    return procs.start([PYTHON, "-m", module, *args],
                       env={**procs.env, "PREFECT_API_URL": str(PREFECT_API_URL.value()), **env})


def stop_pipeline(proc, until, runs: Path) -> tuple[str, Path, str]:
    """SIGTERM once ``until()``; returns (run id, its last.pth, the last line of stderr) after
    checking exit code 130, a `stopped:` last line and no traceback."""
    assert wait_for(until, timeout=180, proc=proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # the CLI's own process
    tally("faults")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    (last,) = runs.glob("pipeline/*/*/last.pth")
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped: "), err[-2000:]
    return last.parent.parent.name, last, last_line


def task_running(name: str) -> bool:
    """True while a task run called ``name-...`` is Running on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{name}-")))
    return any(r.state is not None and r.state.is_running() for r in runs)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr is a single ``error: ...`` line (no traceback) containing every needle."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, stderr)
    return lines[0]


def tiny_cli_config(data_dir: Path, checkpoint_dir: Path, experiment: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The flat config keys (as CLI flags would give them) of a model that trains in a second."""
    cfg = dict(data_dir=str(data_dir), checkpoint_dir=str(checkpoint_dir), experiment_name=experiment,
               hidden_dims=[8, 16], latent_dim=4, batch_size=50, num_epochs=2, val_size=100, progress=False,
               sample_every=0, ema_decay=0.9, learning_rate=3e-3, log_every=5, seed=7)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tiny_data_dir) -> Path:
    """``best_model.pth`` of a tiny model trained for one epoch (shared, read-only)."""
    import torch

    from vae.config import get_default_config
    from vae.train import VAETrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {**get_default_config(), **tiny_cli_config(tiny_data_dir, tmp_path_factory.mktemp("ckpt"), num_epochs=1)}
        result = VAETrainer(cfg).train()
    finally:
        torch.set_num_threads(threads)
    return Path(result["best_model_path"])


def call_cli(cli, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a console-script entry point in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err
