"""Checkpoints written before the redesign still load, compute the same function and resume.

``tests/vae/data/main-272158d-*-last.pth`` were written by main at 272158d (the code before the
redesign) with ``tests/vae/data/make_main_checkpoints.py``: a 1-epoch run of a tiny VAE
(hidden 4-8, latent 2) with each decoder; ``main-272158d-expected.json`` holds that code's
state_dict keys, posterior means and log-variances and the decoder logits' sum on fixed inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vae.utils import load_checkpoint, load_model

DATA = Path(__file__).with_name("data")
EXPECTED = json.loads((DATA / "main-272158d-expected.json").read_text())
DECODERS = ("conv", "autoregressive")


def _inputs() -> torch.Tensor:
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("decoder", DECODERS)
def test_old_checkpoint_has_the_same_state_dict_keys(decoder):
    model, _ = load_model(DATA / f"main-272158d-{decoder}-last.pth")
    assert sorted(model.state_dict()) == EXPECTED[decoder]["keys"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_old_checkpoint_computes_the_same_function(decoder):
    model, _ = load_model(DATA / f"main-272158d-{decoder}-last.pth")
    x = _inputs()
    with torch.no_grad():
        mu, log_var = model.encode(x)
        logits = model.decode_logits(mu, x)
    torch.testing.assert_close(mu, torch.tensor(EXPECTED[decoder]["mu"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_var, torch.tensor(EXPECTED[decoder]["log_var"]), rtol=1e-5, atol=1e-5)
    assert float(logits.double().sum()) == pytest.approx(EXPECTED[decoder]["logits_sum"], rel=1e-5)


def test_old_last_checkpoint_resumes_training(tmp_path):
    from vae.data import ImageData
    from vae.train import VAETrainer

    run_dir = tmp_path / "compat"
    run_dir.mkdir()
    shutil.copy(DATA / "main-272158d-conv-last.pth", run_dir / "last.pth")
    state = load_checkpoint(run_dir / "last.pth")
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(300, 28, 28, generator=gen) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (300,), generator=gen)
    data = ImageData(images[:200], labels[:200], images[200:], labels[200:], {"x": "0"}, "mnist")
    config = {**state["config"], "checkpoint_dir": str(tmp_path), "num_epochs": 2}
    result = VAETrainer(config, resume=True, data=data).train()
    assert result["status"] == "completed"
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["global_step"] == 2 * state["global_step"]
