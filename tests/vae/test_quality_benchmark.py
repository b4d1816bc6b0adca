"""benchmarks/quality.py: the record run's protocol on a tiny model (bound, convergence check,
time-to-quality snapshots) and the z-removed ablation."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.preset_speed import main as preset_speed
from benchmarks.quality import fastest_precision, main, steps_per_second
from benchmarks.time_to_quality import main as time_to_quality, run_label
from vae.checkpoint import load_model
from vae.config import get_benchmark_config, validate_config
from vae.device import cpu_has_bf16_units
from vae.data import load_dataset
from vae.evaluate import evaluate

TINY = ["--epochs", "3", "--minutes", "10", "--hidden_dims", "8", "16", "--latent_dim", "4", "--ar_channels", "8",
        "--ar_kernel", "3", "--batch_size", "50", "--val_size", "100", "--curve_images", "40",
        "--check_images", "30", "--eval_threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_record_protocol_scores_all_test_images_checks_convergence_and_keeps_a_curve(tiny_data_dir, tmp_path,
                                                                                          capsys):
    out_dir = tmp_path / "record"
    assert main([*TINY, "--data_dir", str(tiny_data_dir), "--output_dir", str(out_dir), "--k", "8",
                 "--check_k", "32", "--snapshot_minutes", "1e-6", "--curve_k", "4"]) == 0
    out = json.loads((out_dir / "results.json").read_text())
    assert out["status"] == "completed" and out["epochs"] == 3 and out["k"] == 8
    if sys.platform.startswith("linux"):
        assert out["peak_resident_gb"] > 0.1  # torch alone holds more: the process's peak was read
    assert out["iw_test_images"] == 200  # all of the tiny test set
    assert out["test/iw_nll"] < out["test/nelbo"]  # the same 200 images: the IW bound is tighter
    check = out["convergence"]
    assert check["images"] == 30 and check["check_k"] == 32
    assert check["difference"] == pytest.approx(check["bound_k"] - check["bound_check_k"])
    assert check["difference_se"] > 0
    model, ckpt = load_model(out["model_path"])  # the check scores the evaluation's images, binarised the same way
    same = evaluate(model, load_dataset(str(tiny_data_dir)), loss_type="bce", binarize="dynamic", k=8, probe=False,
                    fid=False, max_test_images=30, seed=ckpt["config"]["seed"])
    assert check["bound_k"] == pytest.approx(same["test/iw_nll_k8"], abs=1e-4)
    curve = out["curve"]  # one point per epoch (a snapshot is due every epoch), the final model last
    assert [row["epoch"] for row in curve] == [1, 2, 3]
    assert all(a["minutes"] < b["minutes"] for a, b in zip(curve, curve[1:]))
    assert all(row["k"] == 4 and row["images"] == 40 for row in curve)
    snapshots = sorted((out_dir / "snapshots").glob("epoch_*.pth"))
    assert len(snapshots) == 3
    model, checkpoint = load_model(snapshots[-1])
    assert model.autoregressive and checkpoint["epoch"] <= 3
    assert (out_dir / "time_to_quality.png").stat().st_size > 0 and out["train_threads"] >= 1
    printed = capsys.readouterr().out
    assert "k=32 vs k=8 on the first 30 test images" in printed and "IW bound k=8 on 200 images" in printed


def test_a_trained_run_is_scored_again_in_a_fresh_process_keeping_the_stages_already_done(tiny_data_dir, tmp_path,
                                                                                          capsys):
    out_dir, data = tmp_path / "run", ["--data_dir", str(tiny_data_dir)]
    args = [*TINY, *data, "--output_dir", str(out_dir), "--k", "8", "--check_k", "0", "--snapshot_minutes", "1e-6",
            "--curve_k", "4"]
    assert main(args) == 0
    first = json.loads((out_dir / "results.json").read_text())
    run = json.loads((out_dir / "training.json").read_text())
    assert run["model_path"] == first["model_path"] and [s["epoch"] for s in run["snapshots"]] == [1, 2, 3]
    # an evaluation stopped during the curve: its bound was saved, the curve was not
    stages = json.loads((out_dir / "evaluation.json").read_text())
    assert set(stages) == {"score", "curve"} and stages["score"]["settings"]["k"] == 8
    stages["score"]["result"]["test/iw_nll"] = 123.0  # marks the saved bound: kept, not scored again
    del stages["curve"]
    (out_dir / "evaluation.json").write_text(json.dumps(stages))
    (out_dir / "results.json").unlink()
    evaluate_only = ["--evaluate_only", *data, "--output_dir", str(out_dir), "--k", "8", "--check_k", "0",
                     "--curve_k", "4", "--curve_images", "40", "--eval_threads", "1"]
    assert main(evaluate_only) == 0
    again = json.loads((out_dir / "results.json").read_text())
    assert again["test/iw_nll"] == 123.0 and again["curve"] == first["curve"]  # same seeds: the same scores
    assert {key: again[key] for key in ("epochs", "status", "config")} == {key: first[key] for key in
                                                                       ("epochs", "status", "config")}
    # other settings score that stage again
    assert main([*evaluate_only, "--k", "16"]) == 0  # the last --k counts
    rescored = json.loads((out_dir / "results.json").read_text())
    assert rescored["k"] == 16 and rescored["test/iw_nll"] != 123.0 and rescored["curve"] == first["curve"]
    capsys.readouterr()
    # user mistakes: clear errors, nothing scored
    for argv, message in ((["--evaluate_only", "--output_dir", str(tmp_path / "none")], "no training.json in"),
                          (["--evaluate_only", "--output_dir", str(out_dir), "--latent_dim", "8"],
                           "drop --latent_dim (only --data_dir may change)"),
                          (["--evaluate_only", "--output_dir", str(out_dir), "--k", "0"], "--k must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # a snapshot gone: the curve already scored is kept (the bound and check can still be scored again) ...
    Path(run["snapshots"][0]["path"]).unlink()
    assert main([*evaluate_only, "--k", "12"]) == 0
    kept = json.loads((out_dir / "results.json").read_text())
    assert kept["k"] == 12 and kept["curve"] == first["curve"]
    # ... a new curve cannot be scored, and the model itself must be there
    with pytest.raises(SystemExit):
        main([*evaluate_only, "--curve_k", "2"])
    assert "the time-to-quality snapshots are gone" in capsys.readouterr().err
    Path(run["model_path"]).unlink()
    with pytest.raises(SystemExit):
        main(evaluate_only)
    assert "names a model file that is gone" in capsys.readouterr().err


def test_the_ablation_removes_z_and_scores_it_exactly_with_one_sample(tiny_data_dir, tmp_path):
    out_dir = tmp_path / "ablation"
    assert main([*TINY, "--data_dir", str(tiny_data_dir), "--output_dir", str(out_dir), "--k", "8",
                 "--check_k", "32", "--snapshot_minutes", "0", "--use_latent", "false"]) == 0
    out = json.loads((out_dir / "results.json").read_text())
    assert out["config"]["use_latent"] is False and out["k"] == 1  # every weight is p(x): k = 1 is exact
    assert out["test/kl"] == 0.0 and out["test/active_units"] == 0
    assert out["test/iw_nll"] == pytest.approx(out["test/nelbo"], abs=1e-3)
    assert "convergence" not in out and out["curve"] == []


def test_the_time_to_quality_figure_draws_one_line_per_run_and_refuses_other_files(tmp_path, capsys):
    rows = [{"minutes": m, "epoch": e, "k": 100, "images": 1000, "iw_nll": nats, "iw_nll_se": 0.5}
            for m, e, nats in ((5.0, 10, 90.0), (10.0, 20, 86.5))]
    runs = []
    for name, use_latent in (("vae", True), ("pixel", False)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"curve": rows, "train_threads": 2,
                                    "config": {"decoder": "autoregressive", "use_latent": use_latent}}))
        runs.append(str(path))
    assert run_label(json.loads(Path(runs[1]).read_text())) == "autoregressive decoder, z removed, 2 threads"
    assert run_label({"config": {"decoder": "autoregressive", "amp": True}, "train_threads": 1}) \
        == "autoregressive decoder, bf16 autocast, 1 thread"
    assert time_to_quality([*runs, "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.count("86.50 ± 0.50 nats") == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        time_to_quality([str(tmp_path / "bad.json"), "--out", str(tmp_path / "no.png")])
    assert exit_.value.code == 2 and "not a results.json of benchmarks/quality.py" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_preset_speed_measures_each_variant_over_the_preset_and_names_a_bad_one(tiny_data_dir, capsys):
    tiny = "--hidden_dims 8 16 --latent_dim 4 --ar_channels 8 --ar_kernel 3 --batch_size 5 --val_size 100"
    data = ["--data_dir", str(tiny_data_dir), "--threads", "1", "--rounds", "1"]
    assert preset_speed([*data, tiny, f"{tiny} --amp true"]) == 0  # 500 training images: 100 steps per epoch
    table = capsys.readouterr().out.split("| variant |")[1].splitlines()[2:]
    assert [row.split(" | ")[0] for row in table] == [f"| {tiny}", f"| {tiny} --amp true"]
    steps, images, ratio = (float(cell.strip(" |")) for cell in table[0].split(" | ")[1:])
    assert steps > 0 and images == pytest.approx(5 * steps, abs=1) and ratio == 1.0
    for variant, says in (("--ar_layers 0", "ar_layers"), ("--no_such_key 1", "not a config flag: --no_such_key 1")):
        with pytest.raises(SystemExit) as exit_:
            preset_speed([*data, variant])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"variant '{variant}'" in err and says in err


def test_the_calibration_trains_with_bf16_autocast_only_where_it_measures_faster(tiny_data_dir, capsys):
    cfg = validate_config({**get_benchmark_config(), "data_dir": str(tiny_data_dir), "device": "cpu",
                           "hidden_dims": [8, 16], "latent_dim": 4, "ar_channels": 8, "ar_kernel": 3,
                           "batch_size": 5, "val_size": 100})
    data = load_dataset(str(tiny_data_dir))
    torch.set_num_threads(1)
    chosen, rate = fastest_precision(cfg, data, amp_given=False)
    printed = capsys.readouterr().out
    if cpu_has_bf16_units():  # both timed: the faster kept, and said
        said = re.fullmatch(r"float32 ([\d.]+) steps/s, bf16 autocast ([\d.]+): (bf16 autocast|float32) "
                            r"\(--amp true/false to choose\)\n", printed)
        fp32, bf16 = float(said[1]), float(said[2])
        assert chosen.run.amp is (said[3] == "bf16 autocast")
        assert (bf16 >= fp32) if chosen.run.amp else (bf16 <= fp32)
        assert f"{rate:.2f}" == (said[2] if chosen.run.amp else said[1])
    else:  # float32 only: bf16 autocast would convert every operand
        assert chosen.run.amp is False and printed == ""
    assert rate > 0
    kept, _ = fastest_precision(cfg, data, amp_given=True)  # --amp given: only that precision is timed
    assert kept.run.amp is False and capsys.readouterr().out == ""


def test_the_calibration_times_each_stretch_on_batches_of_its_own(tiny_data_dir):
    """3 stretches of 10 steps after 2 warm-up steps need 32 of the 33 batches of 15 images: each
    stretch trains (an empty one would take microseconds and report ~10^6 steps/s)."""
    cfg = validate_config({**get_benchmark_config(), "data_dir": str(tiny_data_dir), "device": "cpu",
                           "hidden_dims": [8, 16], "latent_dim": 4, "ar_channels": 8, "ar_kernel": 3,
                           "batch_size": 15, "val_size": 100})
    torch.set_num_threads(1)
    rate = steps_per_second(cfg, load_dataset(str(tiny_data_dir)), steps=10, warmup=2, rounds=3)
    assert 1 < rate < 1e4
