"""Evaluation reports its stages (a line each, bars with ETA) when on, and prints nothing when off."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import sys
import threading

import pytest

from vae.checkpoint import load_checkpoint, save_checkpoint
from vae.classifier import get_classifier
from vae.evaluate import cli, evaluate
from vae.progress import Progress, format_seconds

STAGES = ("evaluate: negative ELBO and latents (50 images) ...", "evaluate: IW bound, k = 2 (50 images) ...",
          "evaluate: linear probe (encode 100 training images, fit) ...",
          "evaluate: sample quality (20 prior samples, classifier FID) ...")


def _evaluate(model, data, classifier, progress):
    return evaluate(model, data, k=2, classifier=classifier, num_samples=20, max_test_images=50,
                    max_train_images=100, batch_size=25, progress=progress)


def test_evaluate_prints_each_stage_with_its_time_when_on(tiny_model, tiny_data, tiny_classifier, capsys):
    _evaluate(tiny_model, tiny_data, tiny_classifier, progress=True)
    err = capsys.readouterr().err
    for line in STAGES:
        assert line in err
    assert err.count(": done in ") == len(STAGES)
    assert "evaluate: IW bound k=2:" in err and "/100 [" in err  # a bar over 50 images x 2 samples


def test_evaluate_prints_nothing_when_off_or_not_on_a_terminal(tiny_model, tiny_data, tiny_classifier, capsys):
    _evaluate(tiny_model, tiny_data, tiny_classifier, progress=False)
    _evaluate(tiny_model, tiny_data, tiny_classifier, progress=None)  # captured stderr is no terminal
    assert capsys.readouterr().err == ""


def test_classifier_training_is_a_stage_with_an_epoch_bar(tiny_data, tmp_path):
    out = io.StringIO()
    get_classifier(tiny_data, tmp_path, width=8, feature_dim=16, epochs=1, progress=Progress(True, out))
    text = out.getvalue()
    assert "evaluate: digit classifier for the FID: training on 600 images (first use" in text
    assert "classifier epoch 1/1" in text and "done in" in text
    out = io.StringIO()
    get_classifier(tiny_data, tmp_path, width=8, feature_dim=16, epochs=1, progress=Progress(True, out))
    assert out.getvalue() == ""  # read from the cache: nothing to wait for


def test_progress_is_off_off_a_terminal_and_leaves_loops_alone():
    off = Progress(None, io.StringIO())
    items = [1, 2, 3]
    assert not off.enabled and off.track(items, "x") is items
    assert (format_seconds(42.4), format_seconds(185), format_seconds(3720)) == ("42 s", "3 min 05 s", "1 h 02 min")


@contextlib.contextmanager
def stderr_on_a_terminal():
    """sys.stderr on a real pseudo-terminal for the block; yields a list that then holds the text
    written to it. (Set inside the test: pytest resets sys.stderr between a fixture and the test.)"""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    text: list[str] = []
    with open(slave, "w", buffering=1) as stream:
        previous, sys.stderr = sys.stderr, stream
        try:
            yield text
        finally:
            sys.stderr = previous
    reader.join(timeout=5)
    os.close(master)
    text.append(b"".join(chunks).decode(errors="replace"))


@pytest.fixture(scope="module")
def progress_checkpoint(tiny_run, tmp_path_factory):
    """The tiny run's checkpoint with ``progress: true`` in its config (the tiny run trains without)."""
    state = load_checkpoint(tiny_run["best_model_path"])
    state["config"]["progress"] = True
    return str(save_checkpoint(state, tmp_path_factory.mktemp("progress") / "best_model.pth"))


def _cli(model_path, data_dir, out, *flags):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model_path", str(model_path), "--data_dir", str(data_dir), "--k", "2", "--no_fid", "--no_figures",
             "--max_test_images", "50", "--max_train_images", "100", "--output_dir", str(out), *flags])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("flags, shown", [((), True), (("--no_progress",), False)])
def test_cli_shows_stages_on_a_terminal_unless_no_progress(progress_checkpoint, tiny_data_dir, tmp_path,
                                                           flags, shown):
    with stderr_on_a_terminal() as written:
        _cli(progress_checkpoint, tiny_data_dir, tmp_path, *flags)
    err = written[0]
    assert ("evaluate: IW bound, k = 2 (50 images) ..." in err) is shown, err
    assert ("evaluate: IW bound k=2:" in err and "0/1 [" in err) is shown, err  # the bar, even on a sizeless pty


def test_cli_honours_the_configs_progress_false_and_forces_progress_on(tiny_run, tiny_data_dir, tmp_path,
                                                                       capsys):
    with stderr_on_a_terminal() as written:
        _cli(tiny_run["best_model_path"], tiny_data_dir, tmp_path)  # trained with progress: false
    assert "evaluate:" not in written[0]
    _cli(tiny_run["best_model_path"], tiny_data_dir, tmp_path, "--progress")  # stderr captured: no terminal
    assert "evaluate: linear probe (encode 100 training images, fit) ..." in capsys.readouterr().err


def test_the_iw_bound_ticks_every_image_sample_pair_and_computes_the_same_bound(tiny_model, tiny_data):
    """The bound's bar advances per decoder pass (a 500-image batch is minutes at k = 1,000), and
    counting changes nothing: same draws, same numbers."""
    import torch

    from vae.likelihood import iw_bound

    x = (tiny_data.test_images[:30].float().unsqueeze(1) / 255 > 0.5).float()
    batches = [(x[:20], None), (x[20:], None)]
    ticks = []
    counted = iw_bound(tiny_model, batches, k=7, loss_type="bce", seed=3, chunk=40, tick=ticks.append)
    assert sum(ticks) == 30 * 7 and len(ticks) > 2
    assert torch.equal(counted, iw_bound(tiny_model, batches, k=7, loss_type="bce", seed=3, chunk=40))
