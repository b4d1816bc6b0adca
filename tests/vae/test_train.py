"""vae.train: the trainer on the tiny data (10 steps per epoch): learning, files, resume, stops,
non-finite losses and the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
import torch

from vae.config import ConfigError
from vae.train import TRAIN_KEYS, VAL_KEYS, Callback, NonFiniteLossError, RunExistsError, VAETrainer, cli
from vae.checkpoint import CheckpointError, load_checkpoint

TIMING_KEYS = {"train/images_per_s"}


class StopAtStart(Callback):
    """Requests a stop before the first step: training stops after one step, mid-epoch."""

    def on_train_start(self, trainer):
        trainer.request_stop("test: stop at start")


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            trainer.request_stop(f"test: stop after epoch {epoch}")


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append(("start",))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch", epoch, sorted(metrics)))

    def on_checkpoint(self, trainer, path, kind):
        self.events.append(("checkpoint", kind, Path(path).name))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result["status"]))


def _comparable(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def _assert_same_history(a, b):
    a, b = _comparable(a), _comparable(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def reference(tiny_config, tmp_path):
    """The uninterrupted two-epoch run of ``tiny_config`` (in its own checkpoint folder)."""
    return VAETrainer({**tiny_config, "checkpoint_dir": str(tmp_path / "reference")}).train()


# -- learning and outputs -------------------------------------------------------------------------
def test_loss_falls_on_the_tiny_data(tiny_config):
    tiny_config["num_epochs"] = 3
    history = VAETrainer(tiny_config).train()["history"]
    assert history[-1]["train/loss"] < 0.9 * history[0]["train/loss"]
    assert history[-1]["val/nelbo"] < history[0]["val/nelbo"]


def test_run_writes_checkpoints_metrics_config_and_samples(tiny_config):
    result = VAETrainer(tiny_config).train()
    run = Path(tiny_config["checkpoint_dir"]) / "tiny"
    assert result["status"] == "completed" and result["epochs_completed"] == 2 and result["global_step"] == 20
    assert result["best_model_path"] == str(run / "best_model.pth")
    assert result["last_model_path"] == str(run / "last.pth")
    for name in ("best_model.pth", "last.pth", "metrics.jsonl", "config.json",
                 "samples/epoch_001.png", "samples/epoch_002.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["latent_dim"] == 4
    grid = Image.open(run / "samples/epoch_002.png")
    assert grid.size[0] >= 600
    assert grid.text["Title"].endswith("samples from the prior after epoch 2 (the same z every epoch)")


def test_metrics_file_has_one_row_per_epoch_with_the_metric_keys(tiny_config):
    VAETrainer(tiny_config).train()
    rows = [json.loads(line) for line in (Path(tiny_config["checkpoint_dir"]) / "tiny" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [10, 20]
    expected = (set(TRAIN_KEYS) - {"train/tc"}) | set(VAL_KEYS) | {"train/beta", "train/lr", "train/images_per_s"}
    assert expected <= set(rows[0])


def test_checkpoints_are_plain_data_with_config_and_states(tiny_config):
    VAETrainer(tiny_config).train()
    run = Path(tiny_config["checkpoint_dir"]) / "tiny"
    best, last = load_checkpoint(run / "best_model.pth"), load_checkpoint(run / "last.pth")
    assert best["config"]["hidden_dims"] == [8, 16] and set(best["metrics"]) >= set(VAL_KEYS)
    assert {"model_state", "ema_state", "epoch", "global_step"} <= set(best)
    assert {"optimizer_state", "scheduler_state", "loss_state", "rng_state", "history"} <= set(last)
    assert last["epoch"] == 2 and last["partial"] is None


def test_checkpoint_optimizer_state_is_per_parameter_and_loads_into_a_plain_adamw(tiny_config):
    """last.pth stores the state an AdamW over the separate parameters has: any reader of it (a
    plain optimizer, the code before the redesign) can load it."""
    from vae.model import VAE
    from vae.optim import create_optimizer, parameter_groups

    trainer = VAETrainer(tiny_config)
    trainer.train()
    state = load_checkpoint(trainer.last_path)["optimizer_state"]
    model = VAE(hidden_dims=[8, 16], latent_dim=4)
    model.load_state_dict(load_checkpoint(trainer.last_path)["model_state"])
    decay, no_decay = parameter_groups(model)
    assert [len(g["params"]) for g in state["param_groups"]] == [len(decay), len(no_decay)]
    for pid, p in enumerate(decay + no_decay):
        assert state["state"][pid]["exp_avg"].shape == p.shape and int(state["state"][pid]["step"]) > 0
    plain = create_optimizer(model, 1e-3)
    plain.load_state_dict(state)  # raises on any mismatch of groups or sizes
    torch.testing.assert_close(plain.state[decay[0]]["exp_avg_sq"], state["state"][0]["exp_avg_sq"])


def test_best_model_is_the_epoch_with_the_lowest_val_nelbo(tiny_config):
    result = VAETrainer(tiny_config).train()
    best = load_checkpoint(result["best_model_path"])
    lowest = min(result["history"], key=lambda r: r["val/nelbo"])
    assert best["epoch"] == lowest["epoch"] and best["metrics"]["val/nelbo"] == lowest["val/nelbo"]


def test_same_seed_gives_the_same_run(tiny_config, reference):
    _assert_same_history(VAETrainer(tiny_config).train()["history"], reference["history"])


def test_disentangled_loss_trains_and_reports_tc(tiny_config):
    tiny_config.update(loss_type="disentangled", num_epochs=1)
    row = VAETrainer(tiny_config).train()["history"][0]
    assert "train/tc" in row and torch.isfinite(torch.tensor(row["train/loss"]))


def test_free_bits_train_on_a_floor_and_report_the_true_elbo(tiny_config):
    tiny_config.update(loss_type="vae", free_bits=1.0, num_epochs=1, reconstruction_loss_type="bce")
    row = VAETrainer(tiny_config).train()["history"][0]
    # the objective pays at least λ per dimension (4 dims x 1 nat); the ELBO's KL is the true one
    assert row["val/loss"] >= row["val/recon"] + 4.0 - 1e-3
    assert row["val/nelbo"] == pytest.approx(row["val/recon"] + row["val/kl"], rel=1e-5)
    assert row["val/kl"] < 4.0 and row["val/loss"] > row["val/nelbo"]


def test_fast_dev_run_trains_one_epoch_of_n_batches(tiny_config):
    tiny_config.update(fast_dev_run=2, num_epochs=50)
    result = VAETrainer(tiny_config).train()
    assert result["epochs_completed"] == 1 and result["global_step"] == 2


def test_invalid_config_is_rejected_before_training(tiny_config):
    with pytest.raises(ConfigError, match="latent_dim"):
        VAETrainer({**tiny_config, "latent_dim": 0})


# -- existing runs and resume -----------------------------------------------------------------------
def test_existing_run_is_not_clobbered(tiny_config):
    VAETrainer({**tiny_config, "num_epochs": 1}).train()
    last = Path(tiny_config["checkpoint_dir"]) / "tiny" / "last.pth"
    before = _sha(last)
    with pytest.raises(RunExistsError, match="--resume .* --overwrite"):
        VAETrainer(tiny_config).train()
    assert _sha(last) == before


def test_overwrite_starts_afresh(tiny_config):
    VAETrainer({**tiny_config, "num_epochs": 1}).train()
    result = VAETrainer(tiny_config, overwrite=True).train()
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_resume_without_a_checkpoint_says_so(tiny_config):
    with pytest.raises(CheckpointError, match="cannot resume: .*last.pth does not exist"):
        VAETrainer(tiny_config, resume=True).train()


def test_a_callback_can_stop_training(tiny_config):
    tiny_config["num_epochs"] = 3
    result = VAETrainer(tiny_config, callbacks=[StopAfterEpoch(1)]).train()
    assert result["status"] == "stopped" and result["stop_reason"] == "test: stop after epoch 1"
    assert result["epochs_completed"] == 1
    assert load_checkpoint(result["last_model_path"])["epoch"] == 1


def test_callbacks_see_start_epochs_checkpoints_and_end(tiny_config):
    rec = Recorder()
    VAETrainer({**tiny_config, "num_epochs": 1}, callbacks=[rec]).train()
    assert rec.events[0] == ("start",)
    assert ("checkpoint", "last", "last.pth") in rec.events and ("checkpoint", "best", "best_model.pth") in rec.events
    epoch_events = [e for e in rec.events if e[0] == "epoch"]
    assert [e[1] for e in epoch_events] == [1] and "val/nelbo" in epoch_events[0][2]
    assert rec.events[-1] == ("end", "completed")


def test_resume_after_mid_epoch_stops_matches_an_uninterrupted_run(tiny_config, reference):
    first = VAETrainer(tiny_config, callbacks=[StopAtStart()]).train()
    assert first["status"] == "stopped" and first["global_step"] == 1
    partial = load_checkpoint(Path(first["last_model_path"]))["partial"]
    assert partial["epoch"] == 1 and partial["next_batch"] == 1
    second = VAETrainer(tiny_config, callbacks=[StopAtStart()], resume=True).train()  # stops again at step 2
    assert second["global_step"] == 2
    final = VAETrainer(tiny_config, resume=True).train()
    assert final["status"] == "completed" and final["global_step"] == 20
    _assert_same_history(final["history"], reference["history"])


def test_resume_from_an_epoch_boundary_matches_an_uninterrupted_run(tiny_config, reference):
    VAETrainer(tiny_config, callbacks=[StopAfterEpoch(1)]).train()
    final = VAETrainer(tiny_config, resume=True).train()
    _assert_same_history(final["history"], reference["history"])
    ref_state = load_checkpoint(reference["last_model_path"])["model_state"]
    for key, value in load_checkpoint(final["last_model_path"])["model_state"].items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5)


def test_resume_restores_the_beta_schedule(tiny_config, tmp_path):
    tiny_config.update(loss_type="beta_vae", beta_start=0.0, beta_end=2.0, beta_steps=15)
    reference = VAETrainer({**tiny_config, "checkpoint_dir": str(tmp_path / "ref")}).train()
    stopped = VAETrainer(tiny_config, callbacks=[StopAfterEpoch(1)]).train()
    assert load_checkpoint(stopped["last_model_path"])["loss_state"] == {"num_steps": 10}
    trainer = VAETrainer(tiny_config, resume=True)
    resumed = trainer.train()
    assert trainer.loss_fn.num_steps == 20 and trainer.loss_fn.beta == 2.0
    assert [r["train/beta"] for r in resumed["history"]] == [pytest.approx(10 / 15 * 2.0), 2.0]
    _assert_same_history(resumed["history"], reference["history"])


def test_retaining_memory_changes_no_result_and_may_change_on_resume(tiny_config, reference):
    assert reference["history"] and tiny_config["retain_memory"] is True  # the reference kept freed memory
    VAETrainer({**tiny_config, "retain_memory": False}, callbacks=[StopAfterEpoch(1)]).train()
    final = VAETrainer(tiny_config, resume=True).train()
    _assert_same_history(final["history"], reference["history"])
    ref_state = load_checkpoint(reference["last_model_path"])["model_state"]
    for key, value in load_checkpoint(final["last_model_path"])["model_state"].items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5)


def test_resume_may_extend_num_epochs(tiny_config):
    VAETrainer({**tiny_config, "num_epochs": 1}).train()
    result = VAETrainer({**tiny_config, "num_epochs": 2}, resume=True).train()
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_resume_removes_temporary_files_left_by_a_killed_save(tiny_config):
    first = VAETrainer({**tiny_config, "num_epochs": 1}).train()
    run_dir = Path(first["run_dir"])
    stale = run_dir / ".last.pth.k3j9x2.tmp"  # what a SIGKILL between write and rename leaves
    stale.write_bytes(b"half a checkpoint")
    VAETrainer({**tiny_config, "num_epochs": 2}, resume=True).train()
    assert not stale.exists()
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["best_model.pth", "last.pth"]


def test_resume_refuses_a_changed_model(tiny_config):
    VAETrainer({**tiny_config, "num_epochs": 1}).train()
    with pytest.raises(ConfigError, match="latent_dim: the run being resumed has 4, got 8"):
        VAETrainer({**tiny_config, "latent_dim": 8}, resume=True).train()


# -- non-finite losses ------------------------------------------------------------------------------
def test_huge_learning_rate_without_clipping_raises_naming_the_step(tiny_config):
    tiny_config.update(learning_rate=10.0, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite at step \d+ \(epoch 1\).*--max_grad_norm"):
        VAETrainer(tiny_config).train()


class PoisonAfterEpoch(Callback):
    """After epoch 1 is saved, records last.pth and makes the weights NaN: epoch 2's loss is NaN."""

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == 1:
            self.last_sha = _sha(trainer.last_path)
            with torch.no_grad():
                trainer.model.fc_mu.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config):
    poison = PoisonAfterEpoch()
    trainer = VAETrainer(tiny_config, callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match=r"at step 10 \(epoch 2\)"):
        trainer.train()
    assert _sha(trainer.last_path) == poison.last_sha
    state = load_checkpoint(trainer.last_path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


# -- command line -------------------------------------------------------------------------------------
def _flags(cfg: dict, *extra: str) -> list[str]:
    return ["--data_dir", cfg["data_dir"], "--checkpoint_dir", cfg["checkpoint_dir"], "--experiment_name", "cli",
            "--hidden_dims", "8", "16", "--latent_dim", "4", "--batch_size", "50", "--val_size", "100",
            "--progress", "false", "--learning_rate", "3e-3", *extra]


def test_cli_trains_with_flags(tiny_config, capsys):
    with pytest.raises(SystemExit) as info:
        cli(_flags(tiny_config, "--num_epochs", "1", "--loss_type", "beta_vae", "--beta_end", "2.0"))
    assert info.value.code == 0
    run = Path(tiny_config["checkpoint_dir"]) / "cli"
    assert (run / "best_model.pth").is_file()
    stored = json.loads((run / "config.json").read_text())
    assert (stored["loss_type"], stored["beta_end"], stored["hidden_dims"]) == ("beta_vae", 2.0, [8, 16])
    assert "completed: 1 epoch(s)" in capsys.readouterr().out


def test_cli_resume_continues_the_stored_run(tiny_config, capsys):
    with pytest.raises(SystemExit):
        cli(_flags(tiny_config, "--num_epochs", "1"))
    with pytest.raises(SystemExit) as info:
        cli(["--resume", "--experiment_name", "cli", "--checkpoint_dir", tiny_config["checkpoint_dir"],
             "--num_epochs", "2"])
    assert info.value.code == 0
    assert "completed: 2 epoch(s)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, field", [
    (["--batch_size", "0"], "batch_size"),
    (["--hidden_dims", "8", "16", "32", "64", "128", "256"], "hidden_dims"),
    (["--ema_decay", "1.5"], "ema_decay"),
])
def test_cli_bad_config_exits_2_with_one_line(tiny_config, capsys, flags, field):
    with pytest.raises(SystemExit) as info:
        cli(_flags(tiny_config, *flags))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and field in err


def test_cli_existing_run_exits_2_and_suggests_resume(tiny_config, capsys):
    with pytest.raises(SystemExit):
        cli(_flags(tiny_config, "--num_epochs", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli(_flags(tiny_config, "--num_epochs", "1"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err


def test_vae_fast_dev_run_makes_a_smoke_run_and_says_so(tiny_config, monkeypatch):
    monkeypatch.setenv("VAE_FAST_DEV_RUN", "2")
    with pytest.warns(UserWarning, match="VAE_FAST_DEV_RUN=2: this is a smoke run of 1 epoch of 2 batch"):
        trainer = VAETrainer({**tiny_config, "num_epochs": 3})
    result = trainer.train()
    assert result["epochs_completed"] == 1 and result["global_step"] == 2


def test_fast_off_trains_the_plain_model_and_fast_on_the_same_state_dict(tiny_config):
    from vae import fast
    from vae.fast import bn_act

    plain = VAETrainer({**tiny_config, "fast": False, "experiment_name": "plain"})
    plain.train()
    assert set(fast.forms(plain.model).values()) == {"plain"}
    accelerated = VAETrainer({**tiny_config, "experiment_name": "fast"})
    accelerated.train()
    assert {"bias_after", "bn_act_conv" if bn_act.library() else "output_conv"} <= set(
        fast.forms(accelerated.model).values())
    assert plain.model.state_dict().keys() == accelerated.model.state_dict().keys()
