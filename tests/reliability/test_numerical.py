"""A NaN/Inf loss stops training with a message naming the step and remedies; the last good
checkpoint is kept."""

from __future__ import annotations

import pytest
import torch

from tests.reliability.conftest import PYTHON, assert_one_line_error, cli_flags, tally, tiny_cli_config
from vae.config import get_default_config
from vae.train import Callback, NonFiniteLossError, VAETrainer
from vae.utils import load_checkpoint


class PoisonWeights(Callback):
    """At the end of ``epoch``, set one weight to ``value``: the next step's loss is not finite."""

    def __init__(self, epoch: int, value: float):
        self.epoch, self.value = epoch, value

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = self.value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_names_the_step_and_remedies_and_keeps_the_last_good_checkpoint(value, tmp_path, tiny_data_dir):
    cfg = {**get_default_config(), **tiny_cli_config(tiny_data_dir, tmp_path / "ck", num_epochs=3, log_every=3)}
    trainer = VAETrainer(cfg, [PoisonWeights(1, value)])
    tally("faults")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    steps_per_epoch = trainer.history[0]["step"]
    message = str(err.value)
    # the first bad step is the first of epoch 2 (steps count from 0), even though the check runs every 3 steps
    assert f"at step {steps_per_epoch} (epoch 2)" in message, message
    assert "learning rate" in message and "--learning_rate" in message and "clipping" in message
    assert "\n" not in message
    last = load_checkpoint(trainer.last_path)
    assert last["epoch"] == 1 and last["partial"] is None
    assert all(torch.isfinite(t).all() for t in last["model_state"].values())
    tally("checkpoints_checked")


def test_training_cli_diverging_exits_2_with_the_step_and_remedies(procs, tmp_path, tiny_data_dir):
    cfg = tiny_cli_config(tiny_data_dir, tmp_path / "ck", learning_rate=10.0, max_grad_norm=0.0, weight_decay=0.0,
                          log_every=1)
    tally("faults")
    res = procs.run([PYTHON, "-m", "vae.train", *cli_flags(cfg)])
    assert res.returncode == 2, res
    line = assert_one_line_error(res.stderr, "NaN or infinite", "at step", "--learning_rate", "--max_grad_norm")
    assert "epoch 1" in line
