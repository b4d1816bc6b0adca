"""Checkpoints are untrusted input: a pickle that would run code is refused without running it."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import PYTHON, assert_one_line_error, call_cli, tally
from vae.sample import VAESampler
from vae.utils import CheckpointError, load_checkpoint, load_model


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, 'w')``): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _craft(kind: str, good: Path, path: Path, marker: Path) -> Path:
    """A checkpoint carrying :class:`Payload` in one of the ways a file can smuggle a pickle."""
    if kind == "zip_in_model_state":  # a real checkpoint with one entry replaced
        state = torch.load(good, weights_only=True)
        state["model_state"] = Payload(marker)
        torch.save(state, path)
    elif kind == "zip_top_level":
        torch.save(Payload(marker), path)
    elif kind == "legacy_format":
        torch.save({"format": 1, "config": {}, "model_state": Payload(marker)}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"format": 1, "model_state": Payload(marker)}, protocol=2))
    else:
        raise ValueError(kind)
    return path


KINDS = ["zip_in_model_state", "zip_top_level", "legacy_format", "raw_pickle"]


class _PlainUnpickler(pickle.Unpickler):
    """What an unsafe load does: unpickle everything, tensors' storages left out."""

    def persistent_load(self, pid):
        return None


def test_the_payload_really_runs_when_loaded_unsafely(tmp_path, trained_checkpoint):
    """Control: unpickled without the safe unpickler, the crafted file does run code, so the tests
    below mean something. (The checkpoint is a zip; its pickle is the ``*/data.pkl`` member.)"""
    marker = tmp_path / "ran"
    path = _craft("zip_in_model_state", trained_checkpoint, tmp_path / "evil.pth", marker)
    with zipfile.ZipFile(path) as archive:
        member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        try:
            _PlainUnpickler(io.BytesIO(archive.read(member))).load()
        except AttributeError:  # the tensors after the payload cannot be rebuilt without storages
            pass
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_refuses_a_code_running_pickle_without_running_it(kind, tmp_path, trained_checkpoint):
    marker = tmp_path / "ran"
    path = _craft(kind, trained_checkpoint, tmp_path / "evil.pth", marker)
    tally("bad_inputs", 3)
    for load in (load_checkpoint, load_model, VAESampler):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert "weights_only` set to `False" not in str(err.value)  # no advice to load it unsafely
    assert not marker.exists(), "the checkpoint's payload ran"


def test_sample_cli_refuses_a_code_running_pickle(procs, tmp_path, trained_checkpoint):
    marker = tmp_path / "ran"
    path = _craft("zip_in_model_state", trained_checkpoint, tmp_path / "evil.pth", marker)
    tally("bad_inputs")
    res = procs.run([PYTHON, "-m", "vae.sample", "--model_path", str(path), "--output_dir", str(tmp_path / "out")])
    assert res.returncode == 2, res
    assert_one_line_error(res.stderr, str(path), "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["legacy_format", "raw_pickle"])
def test_evaluate_and_sample_clis_refuse_other_pickles(kind, tmp_path, trained_checkpoint, capsys):
    from vae.evaluate import cli as evaluate_cli
    from vae.sample import cli as sample_cli

    marker = tmp_path / "ran"
    path = _craft(kind, trained_checkpoint, tmp_path / "evil.pth", marker)
    tally("bad_inputs", 2)
    for cli in (sample_cli, evaluate_cli):
        code, _, err = call_cli(cli, ["--model_path", str(path), "--output_dir", str(tmp_path / "out")], capsys)
        assert code == 2
        assert_one_line_error(err, str(path))
    assert not marker.exists()


def _not_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    state = torch.load(good, weights_only=True)
    files = {
        "missing": (tmp / "missing.pth", "not found"),
        "directory": (tmp, "not found"),
        "empty": (tmp / "empty.pth", "not a readable checkpoint"),
        "text": (tmp / "notes.txt", "not a readable checkpoint"),
        "truncated": (tmp / "truncated.pth", "not a readable checkpoint"),
        "a_tensor": (tmp / "tensor.pth", "not a vae checkpoint"),
        "dict_without_format": (tmp / "plain.pth", "not a vae checkpoint"),
        "future_format": (tmp / "future.pth", "newer than this code"),
        "bad_config": (tmp / "badcfg.pth", "not a usable VAE checkpoint"),
        "weights_do_not_fit": (tmp / "misfit.pth", "not a usable VAE checkpoint"),
    }
    files["empty"][0].write_bytes(b"")
    files["text"][0].write_text("this is not a checkpoint\n")
    files["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(torch.zeros(3), files["a_tensor"][0])
    torch.save({"model_state": state["model_state"]}, files["dict_without_format"][0])
    torch.save({**state, "format": 99}, files["future_format"][0])
    torch.save({**state, "config": {**state["config"], "latent_dim": 0}}, files["bad_config"][0])
    torch.save({**state, "config": {**state["config"], "latent_dim": 9}}, files["weights_do_not_fit"][0])
    return files


def test_model_path_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, trained_checkpoint, capsys):
    from vae.sample import cli

    for name, (path, words) in _not_checkpoints(tmp_path, trained_checkpoint).items():
        tally("bad_inputs")
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert words in str(err.value) and str(path) in str(err.value), (name, str(err.value))
        code, out, err_text = call_cli(cli, ["--model_path", str(path), "--output_dir", str(tmp_path / "out")], capsys)
        assert code == 2, name
        assert_one_line_error(err_text, str(path), words)
    assert not (tmp_path / "out").exists()


def test_missing_model_path_via_the_real_entry_point(procs, tmp_path):
    tally("bad_inputs")
    res = procs.run([PYTHON, "-m", "vae.sample", "--model_path", str(tmp_path / "nowhere" / "best_model.pth")])
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "not found", "nowhere/best_model.pth")


def test_a_good_checkpoint_still_samples(tmp_path, trained_checkpoint):
    """Control: the refusals above are not refusing everything."""
    images = VAESampler(trained_checkpoint, seed=1).sample_random(4)
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all()
