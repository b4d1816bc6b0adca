"""Every code block of the seed README (../shared/seed/vae-README.md) and of vae/README.md runs as written,
and so does every python block of the `library` section of README.md.

How a block runs:
- In a fresh temporary working directory, with ``VAE_FAST_DEV_RUN=2`` (any training is one epoch of
  two batches: the config key ``fast_dev_run``) and ``VAE_DATA_DIR`` pointing at a tiny MNIST with
  5,200 training images, so the presets' default 5,000-image validation split fits.
- ```` ```python ```` blocks: executed one by one, each in a new namespace that pre-provides ``torch`` and,
  for the loss snippets, tensors ``recon_x`` and ``x`` (8 images, values in (0, 1)), ``mu``,
  ``log_var`` and ``z`` (8 x 16). The placeholder ``path/to/model.pth`` is replaced by the path of a
  real trained checkpoint; nothing else is changed.
- ```` ```bash ```` blocks: all blocks of one README run in order in one working directory, through
  ``bash -e``, with ``python`` on PATH being this interpreter (and ``OMP_NUM_THREADS=1``). For the
  seed README (``python vae/train.py``) the working directory holds a copy of ``vae/``, as a
  checkout's root does; for vae/README.md (``python -m vae.train``) ``PYTHONPATH`` holds the
  repository root, as ``pip install -e .`` would.
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
MAIN_README = REPO / "README.md"  # only the python blocks of its `library` section
PLACEHOLDER = "path/to/model.pth"
_BLOCK = re.compile(r"^```(\w+)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _blocks(readme: Path, lang: str, section: str | None = None) -> list[tuple[int, str]]:
    """(first line number, code) of each ```lang block, only between a section's markers if given."""
    if not readme.is_file():
        return []
    text = readme.read_text()
    start, end = 0, len(text)
    if section is not None:
        start = text.index(f"<!-- section:{section} -->")
        end = text.index(f"<!-- /section:{section} -->")
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in _BLOCK.finditer(text, start, end)
            if m.group(1) == lang]


def _python_cases():
    cases = []
    for line, code in _blocks(MAIN_README, "python", section="library"):
        cases.append(pytest.param(MAIN_README, code, id=f"README.md#library:{line}", marks=[pytest.mark.slow]))
    for readme in (SEED_README, VAE_README):
        for line, code in _blocks(readme, "python"):
            trains = any(word in code for word in (".train()", "train_vae_example("))
            marks = [pytest.mark.slow] if trains else []
            cases.append(pytest.param(readme, code, id=f"{readme.name}:{line}", marks=marks))
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


@pytest.mark.slow
def test_vae_readme_cli_blocks_run_as_written(snippet_env):
    blocks = _blocks(VAE_README, "bash")
    if not blocks:
        pytest.skip(f"{VAE_README} is absent or has no bash blocks")
    _run_bash_blocks(blocks, snippet_env, {"PYTHONPATH": str(REPO)})
    assert list(snippet_env.glob("checkpoints/*/best_model.pth"))


def test_vae_readme_lists_every_config_key_with_its_default(monkeypatch):
    from vae.config import get_default_config

    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    text = VAE_README.read_text()
    section = text[text.index("## Configuration"):text.index("## Training")]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.MULTILINE)
    documented = dict(rows)

    def shown(value):
        if isinstance(value, list):
            return " ".join(map(str, value))
        return repr(value) if isinstance(value, str) else str(value)

    assert documented == {key: shown(value) for key, value in get_default_config().items()}
