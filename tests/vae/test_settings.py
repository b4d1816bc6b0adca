"""vae.settings: every VAE_* variable is read there, documented in its table, parsed with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vae import settings

REPO = Path(__file__).resolve().parents[2]


def test_unset_variables_give_the_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings.current({})
    assert s.data_dir is None and s.fast_dev_run == 0 and s.optuna_storage is None
    assert s.cache_dir == Path.home() / ".cache" / "vae-mlops"
    assert s.mlruns_dir == tmp_path / "mlruns" and s.optuna_dir == tmp_path / "optuna"


def test_set_variables_are_read(tmp_path):
    s = settings.current({"VAE_DATA_DIR": "/data/mnist", "VAE_CACHE_DIR": str(tmp_path), "VAE_FAST_DEV_RUN": "2",
                          "VAE_MLRUNS_DIR": str(tmp_path / "runs"), "VAE_OPTUNA_DIR": str(tmp_path / "studies"),
                          "VAE_OPTUNA_STORAGE": "postgresql+psycopg://u@h/db"})
    assert (s.data_dir, s.cache_dir, s.fast_dev_run) == ("/data/mnist", tmp_path, 2)
    assert (s.mlruns_dir, s.optuna_dir) == (tmp_path / "runs", tmp_path / "studies")
    assert s.optuna_storage == "postgresql+psycopg://u@h/db"


def test_a_bad_fast_dev_run_names_the_variable():
    with pytest.raises(settings.SettingsError, match="VAE_FAST_DEV_RUN: must be a whole number.*'soon'"):
        settings.current({"VAE_FAST_DEV_RUN": "soon"})


def test_the_table_documents_every_variable_the_settings_read():
    source = Path(settings.__file__).read_text()
    documented = set(re.findall(r"^``(VAE_\w+)``", settings.__doc__, re.MULTILINE))
    read = set(re.findall(r'env\.get\("(VAE_\w+)"', source))
    assert documented == read and len(read) == 6


def test_no_other_product_module_reads_a_vae_variable():
    readers = [p.relative_to(REPO) for pkg in ("vae", "pipelines", "tuning", "tracking") for p in (REPO / pkg).rglob("*.py")
               if re.search(r"environ(?:\.get)?[\[(]\s*[\"']VAE_", p.read_text()) and p.name != "settings.py"]
    assert readers == []
