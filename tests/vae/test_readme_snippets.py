"""Every code block of the seed README (../shared/seed/vae-README.md), of vae/README.md and of the
pages a newcomer runs from (docs/library.md, docs/evaluation.md) runs as written.

How a block runs:
- In a fresh temporary working directory, with ``VAE_FAST_DEV_RUN=2`` (any training is one epoch of
  two batches: the config key ``fast_dev_run``) and ``VAE_DATA_DIR`` pointing at a tiny MNIST with
  5,200 training images, so the presets' default 5,000-image validation split fits.
- ```` ```python ```` blocks: executed one by one, each in a new namespace that pre-provides ``torch`` and,
  for the seed's loss snippets, tensors ``recon_x`` and ``x`` (8 images, values in (0, 1)), ``mu``,
  ``log_var`` and ``z`` (8 x 16). The placeholder ``path/to/model.pth`` is replaced by the path of a
  real trained checkpoint; nothing else is changed.
- ```` ```bash ```` blocks: all blocks of one page run in order in one working directory, through
  ``bash -e``, with ``OMP_NUM_THREADS=1``. For the seed README (``python vae/train.py``) ``python`` on
  PATH is this interpreter and the working directory holds a copy of ``vae/``, as a checkout's root
  does. The docs pages use ``.venv/bin/python`` as a fresh shell in the checkout would: the working
  directory holds a ``.venv/bin/python`` that runs this interpreter, and ``PYTHONPATH`` holds the
  repository root, as ``make install`` (``pip install -e .``) would. ``path/to/model.pth`` is replaced
  as in python blocks, and the checkpoint is also where ``make demo`` leaves its model
  (``checkpoints/pipeline/<run>/vae_demo/best_model.pth``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SEED_README = REPO.parent / "shared" / "seed" / "vae-README.md"
VAE_README = REPO / "vae" / "README.md"
LIBRARY = REPO / "docs" / "library.md"  # holds the table of config keys
EVALUATION = REPO / "docs" / "evaluation.md"
DOC_PAGES = (VAE_README, LIBRARY, EVALUATION)  # pages whose commands run as `.venv/bin/python ...`
PLACEHOLDER = "path/to/model.pth"
_BLOCK = re.compile(r"^```(\w+)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _blocks(page: Path, lang: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```lang block of a page."""
    if not page.is_file():
        return []
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in _BLOCK.finditer(text) if m.group(1) == lang]


def _is_slow(code: str) -> bool:
    """Blocks that train a model, or evaluate one (the FID trains the digit classifier on first use)."""
    return any(word in code for word in (".train()", "train_vae_example(", "train_one_epoch(", "evaluate("))


def _python_cases():
    cases = []
    for page in (SEED_README, *DOC_PAGES):
        for line, code in _blocks(page, "python"):
            marks = [pytest.mark.slow] if _is_slow(code) else []
            cases.append(pytest.param(page, code, id=f"{page.parent.name}/{page.name}:{line}", marks=marks))
    if not cases:
        cases.append(pytest.param(None, "", id="no-readme", marks=pytest.mark.skip(reason="no README found")))
    return cases


@pytest.fixture
def snippet_env(tmp_path, monkeypatch, preset_data_dir):
    """A temporary cwd and the environment the module docstring describes."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("VAE_FAST_DEV_RUN", "2")
    monkeypatch.setenv("VAE_DATA_DIR", str(preset_data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses: one torch thread, as tests/vae/conftest.py
    return cwd


def _namespace() -> dict:
    gen = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(8, 16, generator=gen), 0.1 * torch.randn(8, 16, generator=gen)
    return {
        "__name__": "__readme__", "torch": torch,
        "recon_x": torch.rand(8, 1, 28, 28, generator=gen).clamp(0.01, 0.99),
        "x": torch.rand(8, 1, 28, 28, generator=gen),
        "mu": mu, "log_var": log_var, "z": mu + torch.exp(0.5 * log_var) * torch.randn(8, 16, generator=gen),
    }


@pytest.mark.parametrize("readme, code", _python_cases())
def test_python_snippet_runs_as_written(readme, code, snippet_env, trained_checkpoint):
    if not readme.is_file():
        pytest.skip(f"{readme} is absent")
    code = code.replace(PLACEHOLDER, str(trained_checkpoint))
    exec(compile(code, f"{readme.name} snippet", "exec"), _namespace())
    if ".train()" in code or "train_vae_example(" in code:
        assert list(snippet_env.glob("checkpoints/*/last.pth")), "the snippet trained but wrote no last.pth"
    if "save_" in code or "sample_vae_example(" in code:
        assert list(snippet_env.rglob("*.png")), "the snippet saved images but no PNG was written"


def _run_bash_blocks(blocks: list[tuple[int, str]], cwd: Path, extra_env: dict[str, str]) -> None:
    env = {**os.environ, **extra_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line, code in blocks:
        proc = subprocess.run(["bash", "-e", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"bash block at line {line} failed:\n{code}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
def test_seed_readme_cli_blocks_run_as_written(snippet_env):
    blocks = _blocks(SEED_README, "bash")
    if not blocks:
        pytest.skip(f"{SEED_README} is absent or has no bash blocks")
    shutil.copytree(REPO / "vae", snippet_env / "vae", ignore=shutil.ignore_patterns("__pycache__"))
    _run_bash_blocks(blocks, snippet_env, {})
    for run in ("my_vae", "my_beta_vae", "custom_vae"):
        assert (snippet_env / "checkpoints" / run / "best_model.pth").is_file(), run
    assert (snippet_env / "samples" / "samples.png").is_file()


def _checkout_venv(cwd: Path) -> None:
    """``cwd/.venv/bin/python``: this interpreter, as ``make install`` leaves it in a checkout."""
    python = cwd / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in DOC_PAGES if _blocks(p, "bash")], ids=lambda p: str(p.relative_to(REPO)))
def test_doc_page_bash_blocks_run_as_written(page, snippet_env, trained_checkpoint):
    _checkout_venv(snippet_env)
    demo_model = snippet_env / "checkpoints" / "pipeline" / "run" / "vae_demo" / "best_model.pth"
    demo_model.parent.mkdir(parents=True)
    shutil.copy(trained_checkpoint, demo_model)  # what `make demo` leaves, for commands that use its model
    blocks = [(line, code.replace(PLACEHOLDER, str(trained_checkpoint))) for line, code in _blocks(page, "bash")]
    _run_bash_blocks(blocks, snippet_env, {"PYTHONPATH": str(REPO)})
    if page == LIBRARY:  # it trains my_vae, then samples from it
        assert (snippet_env / "checkpoints" / "my_vae" / "best_model.pth").is_file()
        assert (snippet_env / "samples" / "my_vae" / "samples.png").is_file()
    if page == EVALUATION:
        assert (snippet_env / "outputs" / "eval" / "metrics.json").is_file()


def test_library_page_lists_every_config_key_with_its_default(monkeypatch):
    from vae.config import get_default_config

    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    text = LIBRARY.read_text()
    start = text.index("\n## Configuration\n")
    section = text[start:text.index("\n## ", start + 1)]
    key_tables = [t for t in section.split("\n\n") if t.startswith("| key | default |")]
    rows = [row for t in key_tables for row in re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", t, re.MULTILINE)]
    documented = dict(rows)

    def shown(value):
        if isinstance(value, list):
            return " ".join(map(str, value))
        return repr(value) if isinstance(value, str) else str(value)

    assert len(rows) == len(documented), "a key is listed twice"
    assert documented == {key: shown(value) for key, value in get_default_config().items()}
