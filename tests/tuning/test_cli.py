"""The command line: bad input exits 2 with one line before any work; a good one runs a sweep."""

from __future__ import annotations

import json

import optuna
import pytest

from tuning.__main__ import main


def _tiny_args(study_name, tiny_fixed, *extra):
    fixed = [f"--set={k}={json.dumps(v)}" for k, v in tiny_fixed.items()]
    return ["--study-name", study_name, "--preset", "default", "--latent-dims", "2", "4", "--threads", "1",
            "--no-plots", *fixed, *extra]


@pytest.mark.parametrize("args, words", [
    (["--set", "latnt_dim=4"], "latnt_dim: unknown key (did you mean 'latent_dim'?)"),
    (["--set", "num_epochs"], "expected KEY=VALUE"),
    (["--param", "batch_size=-3"], "batch_size: must be >= 1"),
    (["--lr-range", "3e-3", "1e-4"], "need finite LOW < HIGH"),
    (["--beta-range", "-1", "2"], "LOW > 0"),
    (["--search", "weight_decay=log:0:1"], "LOW > 0"),
    (["--storage", "mysql+nosuchdriver://u@h/db"], "--storage"),
    (["--storage", "::"], "not a database URL"),
    (["--multi-objective", "--pruner", "median"], "cannot prune multi-objective"),
    (["--n-trials", "0"], "--n-trials: must be an integer >= 1"),
    (["--set", "data_dir={tmp}/no-mnist"], "mnist data not found in {tmp}/no-mnist"),
])
def test_bad_input_exits_2_with_one_line_and_no_study(optuna_dir, tmp_path, capsys, args, words):
    args, words = [a.format(tmp=tmp_path) for a in args], words.format(tmp=tmp_path)
    assert main(["--n-trials", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not (optuna_dir / "studies.db").exists()


def test_unknown_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--n-trails", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--n-trails" in err


def test_cli_runs_a_sweep_and_prints_a_line_per_trial(optuna_dir, capsys, study_name, tiny_fixed):
    assert main(_tiny_args(study_name, tiny_fixed, "--n-trials", "2", "--set", "num_epochs=1")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 2 and all(" complete " in line and "| best " in line for line in lines)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{optuna_dir / 'studies.db'}")
    assert len(study.trials) == 2
    assert main(["--study-name", study_name, "--show-best"]) == 0
    assert json.loads(capsys.readouterr().out)["latent_dim"] == study.best_params["latent_dim"]
