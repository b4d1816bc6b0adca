"""Every shell command README.md, docs/tuning.md, docs/pipelines.md and docs/serving.md show works when pasted into a
fresh shell in the checkout, after ``make demo``.

How it runs: the checkout's files (``git ls-files``) are copied into a temporary folder whose
``.venv/bin/`` holds this interpreter and its tools (as ``make install`` leaves them, marked
installed so make never reinstalls). The state ``make demo`` leaves is made first: a trained model
at ``checkpoints/pipeline/<run>/vae_demo/best_model.pth`` and a finished run in the MLflow
experiment ``vae_demo``. Then each command of the pages' ```` ```bash ```` blocks, in page order,
runs through ``bash -c`` from that folder in an environment cleared to PATH, a temporary HOME,
``VAE_DATA_DIR`` (a tiny MNIST) and the knobs only tests set: ``VAE_FAST_DEV_RUN=2`` (any
training is one epoch of two batches), ``TRIALS=1`` (``make sweep``'s default number of trials)
and ``OMP_NUM_THREADS=1`` (the suite runs many processes at once).
``--n-trials N`` and ``n_trials=N`` run as 1. Each must exit 0.

Commands that serve until stopped, or that are the suite and the demo themselves, are checked
with ``make -n``, and (slow) what they run imports or answers ``--help`` (:data:`DRY`); commands
that need shared services (PostgreSQL, an MLflow server, a deployed flow) are listed in
:data:`NOT_HERE`. Not marked slow: README.md's commands (``make sample``, ``make compare``,
``make sweep``) and the ``make -n`` checks. Slow: the docs pages' commands; the Prefect flows among
them are parsed up to ``--help`` (or imported) only: tests/pipelines and tests/tuning run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_idx_dataset

REPO = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/tuning.md", "docs/pipelines.md", "docs/serving.md")
_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# make targets checked with `make -n`, and what they run with --help or an import (an empty list: no
# more). They serve until Ctrl-C, are the demo or the suite themselves, or need `make server`/the stack.
DRY = {
    "demo": ["-c", "import pipelines.demo"], "test": ["-c", "import pytest"],
    "ui": ["-m", "mlflow", "ui", "--help"],
    "server": ["prefect", "server", "start", "--help"], "worker": ["prefect", "worker", "start", "--help"],
    "pool": [], "deploy": [], "run-deployment": [],
    "dashboard": ["-c", "import tuning.options"],
    "stack-up": [], "stack-down": [], "stack-status": [],
    # serve: until Ctrl-C; score: needs a registered champion (tests/pipelines/test_scoring.py runs the flow).
    "serve": ["-m", "mlflow", "models", "serve", "--help"], "score": ["-c", "import pipelines.scoring"],
}
# Commands that need services this test does not start: (page, start of the command, why).
NOT_HERE = [
    ("docs/tuning.md", "export MLFLOW_TRACKING_URI=http://mlflow-host", "a shared MLflow server"),
    ("docs/tuning.md", "S=postgresql", "a PostgreSQL server"),
    ("docs/tuning.md", ".venv/bin/python -m tuning --storage $S", "a PostgreSQL server"),
    ("docs/tuning.md", ".venv/bin/prefect deployment run", "a Prefect server with the deployment and a worker"),
    ("docs/serving.md", "curl -s http://127.0.0.1:5001/invocations", "a running make serve"),
]
FLOWS = ("-m pipelines.training", "-m pipelines.retraining", "from tuning.flow import vae_sweep")


def _commands(page: str) -> list[str]:
    """The command lines of a page's bash blocks: continuations joined, comment-only lines dropped."""
    text = (REPO / page).read_text()
    out = []
    for block in _BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _kind(page: str, command: str) -> str:
    if any(page == p and command.startswith(start) for p, start, _ in NOT_HERE):
        return "not here"
    words = command.split()
    if words[0] == "make" and any(w in DRY for w in words[1:]):
        return "dry"
    return "flow" if any(f in command for f in FLOWS) else "run"


def _checkout(root: Path) -> Path:
    """A copy of the checkout's files with a ``.venv`` of this interpreter, marked installed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real_bin = Path(sys.executable).parent
    for tool in ("python", "prefect", "mlflow", "optuna-dashboard"):
        target = sys.executable if tool == "python" else real_bin / tool
        if Path(target).exists():
            (bin_dir / tool).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
            (bin_dir / tool).chmod(0o755)
    (root / ".venv" / ".installed").touch()  # newer than pyproject.toml: make does not reinstall
    return root


def _run(command: str, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


SEED_DEMO = """
import shutil, sys, tracking
from pathlib import Path
client = tracking.get_client()
run = client.create_run(tracking.ensure_experiment(client, "vae_demo"))
tracking.log_params(client, run.info.run_id, {"model.latent_dim": 4})
tracking.log_metrics(client, run.info.run_id, {"val/nelbo": 200.0, "test/iw_nll_k1000": 190.0})
client.set_terminated(run.info.run_id)
best = Path("checkpoints/pipeline", run.info.run_id, "vae_demo", "best_model.pth")
best.parent.mkdir(parents=True)
shutil.copy(sys.argv[1], best)
"""


@pytest.fixture(scope="module")
def user_checkout(tmp_path_factory, trained_demo_model):
    """A checkout after ``make demo``, and the clean environment of a fresh shell in it."""
    root = _checkout(tmp_path_factory.mktemp("checkout"))
    home = tmp_path_factory.mktemp("home")
    data = write_idx_dataset(tmp_path_factory.mktemp("mnist"), n_train=1200, n_test=100)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "VAE_DATA_DIR": str(data), "VAE_FAST_DEV_RUN": "2",
           "TRIALS": "1", "OMP_NUM_THREADS": "1"}
    _check(_run(f".venv/bin/python -c '{SEED_DEMO}' {trained_demo_model}", root, env), "making the demo's state")
    return root, env


@pytest.fixture(scope="module")
def trained_demo_model(tmp_path_factory) -> Path:
    """A tiny model trained for one epoch (what ``make demo`` leaves, smaller)."""
    from vae.config import get_default_config
    from vae.train import VAETrainer

    data = write_idx_dataset(tmp_path_factory.mktemp("train_mnist"), n_train=300, n_test=50)
    cfg = {**get_default_config(), "data_dir": str(data), "checkpoint_dir": str(tmp_path_factory.mktemp("ck")),
           "hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "num_epochs": 1, "val_size": 50,
           "progress": False, "sample_every": 0}
    return Path(VAETrainer(cfg).train()["best_model_path"])


def test_the_pages_show_commands_of_every_kind():
    kinds = {_kind(page, c) for page in PAGES for c in _commands(page)}
    assert kinds == {"run", "dry", "flow", "not here"}
    listed = [(page, start) for page, start, _ in NOT_HERE
              if not any(c.startswith(start) for c in _commands(page))]
    assert listed == [], "NOT_HERE names commands the pages no longer show"


def _run_page(page: str, kinds: set[str], root: Path, env: dict[str, str]) -> list[str]:
    """Run the page's commands of these kinds in order; returns them."""
    ran = []
    for command in _commands(page):
        if _kind(page, command) in kinds:
            _check(_run(_small(command), root, env, timeout=600), f"{page}: {command}")
            ran.append(command)
    return ran


def test_the_readme_commands_run_as_pasted(user_checkout):
    root, env = user_checkout
    ran = _run_page("README.md", {"run"}, root, env)
    assert {"make sample", "make sweep", "make compare"} <= set(ran)
    assert list((root / "samples" / "demo").glob("*.png")), "make sample wrote no PNG"
    assert list((root / "outputs" / "compare" / "vae_demo").iterdir()), "make compare wrote nothing"
    assert (root / "optuna" / "studies.db").is_file(), "make sweep made no study"


def _flow_check(command: str) -> str:
    """A flow command as the slow test runs it: its flags parsed up to ``--help``, or its import."""
    if " -c " in command:
        return re.sub(r';.*"$', '"', command)  # `python -c "from tuning.flow import vae_sweep; ..."`
    return f"{command} --help"


@pytest.mark.slow
def test_the_docs_commands_run_as_pasted(user_checkout):
    """docs/tuning.md, then docs/pipelines.md, in order (``--show-best`` reads the sweep tuning.md
    ran). The Prefect flows among them (pipelines.training, pipelines.retraining, vae_sweep) are
    only parsed up to ``--help`` or imported: tests/pipelines and tests/tuning run them end to end,
    and here they took 5 minutes of the suite's 10."""
    root, env = user_checkout
    ran = []
    for page in PAGES[1:]:
        for command in _commands(page):
            kind = _kind(page, command)
            if kind in ("run", "flow"):
                pasted = _small(command) if kind == "run" else _flow_check(command)
                _check(_run(pasted, root, env, timeout=600), f"{page}: {pasted}")
                ran.append(command)
    assert sum(_kind("", c) == "flow" for c in ran) >= 4
    assert any("--show-best" in c for c in ran)


def test_serving_commands_resolve(user_checkout):
    """``make -n`` of each command that serves until stopped (or is the demo, the suite, the stack)."""
    root, env = user_checkout
    targets = set()
    for page, command in [(page, c) for page in PAGES for c in _commands(page) if _kind(page, c) == "dry"]:
        dry = _run(command.replace("make ", "make -n ", 1), root, env)
        _check(dry, f"{page}: make -n ({command})")
        for target in (w for w in command.split()[1:] if w in DRY):
            assert target.startswith("stack-") or ".venv/bin/" in dry.stdout, f"{command}: not through .venv/bin/"
            targets.add(target)
    assert {"demo", "test", "ui", "dashboard", "server", "worker"} <= targets


@pytest.mark.slow
def test_serving_targets_programs_start(user_checkout):
    """What such targets run imports, or answers --help (they are not started: they would not return).
    One interpreter for the Python ones, since each start costs seconds of the suite."""
    root, env = user_checkout
    modules = sorted({m for program in DRY.values() if program[:1] == ["-c"] and program[1].startswith("import ")
                      for m in program[1].removeprefix("import ").split(", ")})
    checks = [[".venv/bin/python", "-c", "import " + ", ".join(modules)]]
    checks += [[".venv/bin/python", *program] for program in DRY.values() if program[:1] == ["-m"]]
    checks += [[f".venv/bin/{program[0]}", *program[1:]] for program in DRY.values() if program and program[0][0] != "-"]
    for program in checks:
        _check(subprocess.run(program, cwd=root, env=env, capture_output=True, text=True, timeout=120),
               " ".join(program))
    assert len(checks) == 5  # the imports; mlflow ui, mlflow models serve, prefect server start, worker start --help


def test_make_sample_without_a_demo_model_says_what_to_do(user_checkout, tmp_path):
    root, env = user_checkout
    for name in ("Makefile", "pyproject.toml"):  # a checkout where `make demo` has not run yet
        shutil.copy2(root / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(root / ".venv")
    proc = subprocess.run(["make", "-s", "sample"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "run make demo first, or pass MODEL=" in proc.stderr


def _small(command: str) -> str:
    """A command as the tests run it: one trial for any number of trials."""
    return re.sub(r"(--n-trials |n_trials=)\d+", r"\g<1>1", command)
