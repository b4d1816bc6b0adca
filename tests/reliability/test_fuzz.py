"""Property-based: random bytes and random configurations reach the loaders and validators, and
only the project's own clear errors (DataError, ConfigError, CheckpointError) come out."""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FILES, write_idx_dataset
from tests.reliability.conftest import tally
from vae.config import Config, ConfigError, add_config_arguments, config_from_args, get_default_config, validate_config
from vae.data import DataError, check_idx, load_dataset
from vae.utils import CheckpointError, load_checkpoint, load_model

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = sorted(get_default_config())


# -- IDX bytes -------------------------------------------------------------------------------------
def _idx_like() -> st.SearchStrategy[bytes]:
    """Headers that are nearly right (real magics, small counts, 28x28 or not) over random payloads."""
    header = st.tuples(st.sampled_from([2049, 2051, 2048, 0, 2 ** 32 - 1]), st.integers(0, 40),
                       st.sampled_from([28, 27, 0, 2 ** 31]), st.sampled_from([28, 1]))
    return st.builds(lambda h, extra, tail: struct.pack(">IIII", *h)[: extra % 17] + tail if extra % 3 == 0
                     else struct.pack(">IIII", *h) + tail,
                     header, st.integers(0, 50), st.binary(max_size=2000))


ANY_BYTES = st.one_of(st.binary(max_size=3000), _idx_like())


@FUZZ
@given(content=ANY_BYTES, kind=st.sampled_from(["images", "labels"]))
def test_check_idx_accepts_or_raises_data_error(content, kind):
    tally("bad_inputs")
    try:
        count = check_idx(content, "fuzz-ubyte", kind)
    except DataError as e:
        assert "fuzz-ubyte" in str(e) and "\n" not in str(e)
    else:
        assert count >= 0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("fuzz_data"), n_train=30, n_test=10)


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # setenv each time
@given(content=ANY_BYTES, which=st.sampled_from(sorted(FILES.values())),
       packing=st.sampled_from(["gz", "raw", "gz_garbage"]))
def test_load_dataset_with_one_random_file_raises_only_data_error(pristine, content, which, packing, monkeypatch):
    tally("bad_inputs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(pristine, Path(tmp) / "data"))
        raw = root / "MNIST" / "raw"
        (raw / f"{which}.gz").unlink()
        if packing == "gz":
            (raw / f"{which}.gz").write_bytes(gzip.compress(content))
        elif packing == "gz_garbage":  # a gzip header over random bytes, or a cut-off stream
            (raw / f"{which}.gz").write_bytes((gzip.compress(content)[:10] + content)[: 10 + len(content) // 2])
        else:
            (raw / which).write_bytes(content)
        monkeypatch.setenv("VAE_CACHE_DIR", str(Path(tmp) / "cache"))
        try:
            load_dataset(root, "mnist", download=False)
        except DataError as e:
            assert which in str(e) or "SHA-256" in str(e) or "labels" in str(e), str(e)
            cache = Path(tmp) / "cache"
            assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


# -- configurations ---------------------------------------------------------------------------------
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["mse", "bce", "vae", "beta_vae", "cosine", "mnist", "auto", "cpu", "true"]))
_VALUES = st.one_of(_SCALARS, st.lists(st.one_of(st.integers(-4, 300), st.booleans(), st.text(max_size=3)), max_size=7),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=15), st.integers())


@FUZZ
@given(raw=st.dictionaries(_KEYS, _VALUES, max_size=8))
def test_validate_config_returns_a_config_or_raises_config_error(raw):
    tally("bad_inputs")
    try:
        cfg = validate_config(raw)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        for key in raw:  # every bad key the loop can see is named
            if key not in FIELDS:
                assert any(p.startswith(f"{key}:") for p in e.problems), (key, e.problems)
    else:
        assert isinstance(cfg, Config) and validate_config(cfg.to_dict()) == cfg


@FUZZ
@given(raw=st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers()), st.binary()))
def test_validate_config_refuses_non_mappings(raw):
    with pytest.raises(ConfigError):
        validate_config(raw)


_FLAG_VALUES = st.one_of(st.text(alphabet="0123456789.-+eainfxyz", min_size=1, max_size=6),
                         st.sampled_from(["0", "-1", "1e400", "nan", "inf", "true", "maybe", "vae", "mse", "28"]))


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(FIELDS), st.lists(_FLAG_VALUES, min_size=1, max_size=3)), max_size=5))
def test_cli_flags_parse_and_validate_or_fail_cleanly(flags):
    parser = add_config_arguments(argparse.ArgumentParser(exit_on_error=False))
    argv = [tok for key, values in flags for tok in (f"--{key}", *values)]
    tally("bad_inputs")
    try:
        config_from_args(parser.parse_args(argv))
    except ConfigError:
        pass
    except (argparse.ArgumentError, SystemExit) as e:  # argparse's own usage errors exit 2
        assert not isinstance(e, SystemExit) or e.code == 2


# -- checkpoint bytes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint_bytes(trained_checkpoint) -> bytes:
    return trained_checkpoint.read_bytes()


@FUZZ
@given(data=st.data())
def test_random_or_damaged_checkpoint_bytes_raise_only_checkpoint_error(good_checkpoint_bytes, data):
    good = good_checkpoint_bytes
    mode = data.draw(st.sampled_from(["random", "truncated", "flipped"]))
    if mode == "random":
        content = data.draw(st.binary(max_size=2000))
    elif mode == "truncated":
        content = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        pos = data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8))
        buf = bytearray(good)
        for p in pos:
            buf[p] ^= data.draw(st.integers(1, 255))
        content = bytes(buf)
    tally("bad_inputs")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.pth"
        path.write_bytes(content)
        try:
            model, _ = load_model(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:  # a flip in the weights' bytes still loads: the file holds plain data, nothing ran
            assert isinstance(model, torch.nn.Module)


@FUZZ
@given(entry=st.sampled_from(["config", "model_state", "ema_state", "format"]),
       value=st.one_of(_VALUES, st.just(torch.zeros(2)), st.dictionaries(st.text(max_size=8), st.just(torch.ones(3)), max_size=3)))
def test_checkpoint_with_a_wrong_entry_raises_only_checkpoint_error(trained_checkpoint, entry, value):
    state = torch.load(trained_checkpoint, weights_only=True)
    state[entry] = value
    tally("bad_inputs")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "odd.pth"
        torch.save(state, path)
        try:
            load_model(path)
            load_checkpoint(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
