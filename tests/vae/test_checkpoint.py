"""vae.checkpoint: atomic writes, weights_only reads, clear errors, load_model."""

from __future__ import annotations

import pytest
import torch

from vae.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint
from vae.model import VAE


def test_checkpoint_round_trips_plain_data(tmp_path):
    state = {"epoch": 3, "weights": torch.arange(4.0), "config": {"hidden_dims": [8, 16]}}
    path = save_checkpoint(state, tmp_path / "run" / "last.pth")
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT and loaded["epoch"] == 3 and loaded["config"]["hidden_dims"] == [8, 16]
    assert torch.equal(loaded["weights"], torch.arange(4.0))


def test_checkpoint_write_leaves_no_temporary_files(tmp_path):
    save_checkpoint({"a": 1}, tmp_path / "x.pth")
    save_checkpoint({"a": 2}, tmp_path / "x.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]
    assert load_checkpoint(tmp_path / "x.pth")["a"] == 2


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    save_checkpoint({"a": 1}, tmp_path / "x.pth")
    with pytest.raises(Exception):
        save_checkpoint({"a": lambda: None}, tmp_path / "x.pth")  # cannot be pickled
    assert load_checkpoint(tmp_path / "x.pth")["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*none.pth"):
        load_checkpoint(tmp_path / "none.pth")


def test_foreign_dict_is_not_a_vae_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a vae checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_newer_checkpoint_format_is_refused(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT + 1}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(tmp_path / "new.pth")


def test_load_model_rebuilds_the_vae_with_ema_weights(trained_checkpoint):
    model, state = load_model(trained_checkpoint)
    assert isinstance(model, VAE) and not model.training and model.latent_dim == 4
    torch.testing.assert_close(model.state_dict()["fc_mu.weight"], state["ema_state"]["module"]["fc_mu.weight"])
    raw, _ = load_model(trained_checkpoint, use_ema=False)
    torch.testing.assert_close(raw.state_dict()["fc_mu.weight"], state["model_state"]["fc_mu.weight"])
