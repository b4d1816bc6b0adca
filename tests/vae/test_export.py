"""vae-export: a checkpoint slimmed to one copy of the weights, loading to the same tensors."""

from __future__ import annotations

import pytest
import torch

from vae.checkpoint import load_checkpoint, load_model
from vae.export import cli, export_weights
from vae.sample import VAESampler


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_keeps_the_ema_weights_and_the_config_only(trained_checkpoint, tmp_path):
    last = trained_checkpoint.parent / "last.pth"  # holds the optimizer's moments too
    out = export_weights(last, tmp_path / "slim.pth")
    assert out["weights"] == "ema" and out["epoch"] == 1
    assert out["bytes_after"] < out["bytes_before"] / 2, out  # one copy of the weights instead of two + Adam's two
    slim, full = load_checkpoint(tmp_path / "slim.pth"), load_checkpoint(last)
    assert "optimizer_state" not in slim and slim["ema_state"] is None and "history" not in slim
    assert slim["config"] == full["config"] and slim["global_step"] == full["global_step"]
    assert slim["exported"] == {"from": str(last), "weights": "ema"}
    assert _same(load_model(tmp_path / "slim.pth")[0], load_model(last)[0])
    # the live weights differ from their average, so the test above could tell them apart
    assert not _same(load_model(tmp_path / "slim.pth")[0], load_model(last, use_ema=False)[0])


def test_export_live_weights_and_best_model_metrics(trained_checkpoint, tmp_path):
    out = export_weights(trained_checkpoint, tmp_path / "live.pth", use_ema=False)
    assert out["weights"] == "live"
    assert _same(load_model(tmp_path / "live.pth")[0], load_model(trained_checkpoint, use_ema=False)[0])
    assert load_checkpoint(tmp_path / "live.pth")["metrics"] == load_checkpoint(trained_checkpoint)["metrics"]


def test_exported_checkpoint_samples_like_the_original(trained_checkpoint, tmp_path):
    export_weights(trained_checkpoint, tmp_path / "slim.pth")
    a = VAESampler(trained_checkpoint, seed=3).sample_random(4)
    b = VAESampler(tmp_path / "slim.pth", seed=3).sample_random(4)
    assert torch.equal(a, b)


def test_cli_prints_what_it_wrote(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--model_path", str(trained_checkpoint), "--output", str(tmp_path / "m.pth")])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'm.pth'}: the ema weights of epoch 1, ")


def test_cli_refuses_to_overwrite_its_source(trained_checkpoint, tmp_path, capsys):
    source = tmp_path / "best.pth"
    source.write_bytes(trained_checkpoint.read_bytes())
    with pytest.raises(SystemExit) as e:
        cli(["--model_path", str(source), "--output", str(source)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --output is the checkpoint being exported ({source}); "
                                              f"name another file")
    assert source.read_bytes() == trained_checkpoint.read_bytes()


def test_cli_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--model_path", str(tmp_path / "none.pth"), "--output", str(tmp_path / "out.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found:") and "\n" not in err
    assert not (tmp_path / "out.pth").exists()
