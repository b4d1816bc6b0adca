"""A sweep shows each trial's start and epochs while it trains (when asked or on a terminal), and
names its objectives for optuna-dashboard."""

from __future__ import annotations

import io
import re

import optuna

from tuning.__main__ import parse_options
from tuning.progress import TrialProgress, progress_wanted
from tuning.study import open_study
from tuning.sweep import run_sweep


def test_sweep_prints_a_line_per_trial_epoch_when_progress_is_on(tiny_options, capsys):
    opts = tiny_options(n_trials=1, progress=True, fixed={"num_epochs": 2})
    run_sweep(opts)
    out = capsys.readouterr().out
    started = re.search(r"trial   0 started \| (.*)\n", out)
    assert started and sorted(p.split("=")[0] for p in started[1].split()) == ["beta", "latent_dim", "learning_rate"]
    assert re.search(r"trial   0 epoch 1/2 \| val/nelbo \d+\.\d{3} \| \d+ s, ETA \d+ s\n", out), out
    assert re.search(r"trial   0 epoch 2/2 \| val/nelbo \d+\.\d{3} \| \d+ s\n", out), out  # last: no ETA
    study = optuna.load_study(study_name=opts.study_name, storage=opts.storage_url)
    assert study.metric_names == ["val/nelbo (nats per image)"]


def test_sweep_is_quiet_per_epoch_when_off_or_not_on_a_terminal(tiny_options, capsys):
    for total, progress in ((1, False), (2, None)):  # None: stdout (captured here) is no terminal
        run_sweep(tiny_options(n_trials=total, progress=progress, fixed={"num_epochs": 1}))  # n_trials: the total
    out = capsys.readouterr().out
    assert "trial   0 complete" in out and "trial   1 complete" in out  # the per-trial lines stay
    assert " epoch 1/1 " not in out and " started " not in out


def test_progress_flags_and_their_default():
    assert [parse_options(argv)[0].progress for argv in ([], ["--progress"], ["--no-progress"])] == [None, True, False]
    assert progress_wanted(None, io.StringIO()) is False and progress_wanted(True, io.StringIO()) is True


def test_trial_progress_line_with_a_worker_prefix():
    out = io.StringIO()
    line = TrialProgress(7, {"beta": 1.234567}, "val/nelbo", 4, prefix="[worker 1] ", stream=out)
    line.on_train_start(None)
    line.on_epoch_end(None, 1, {"val/nelbo": 150.0})
    first, second = out.getvalue().splitlines()
    assert first == "[worker 1] trial   7 started | beta=1.23"
    assert re.fullmatch(r"\[worker 1\] trial   7 epoch 1/4 \| val/nelbo 150\.000 \| 0 s, ETA 0 s", second)


def test_multi_objective_and_existing_studies_get_metric_names(tiny_options):
    opts = tiny_options(n_trials=1, multi_objective=True)
    assert open_study(opts, create=True).metric_names == ["val/recon (nats per image)", "val/kl (nats per image)"]
    old = tiny_options(n_trials=1, study_name="made-before-names", objective="iw", iw_k=3)
    optuna.create_study(study_name=old.study_name, storage=old.storage_url)  # as an older version left it
    assert open_study(old, create=True).metric_names == ["val/iw_nll_k3 (nats per image)"]
