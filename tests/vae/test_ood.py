"""vae.ood: per-image anomaly scores equal the evaluation's figures; the complexity correction and
AUROC do what their papers define; vae.images reads what users bring and names what is wrong."""

from __future__ import annotations

import gzip
import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_digits
from vae.data import Split, idx_bytes
from vae.evaluate import evaluate
from vae.images import ImageFileError, read_images
from vae.model import VAE
from vae.ood import anomaly_scores, auroc, complexity_corrected, complexity_nats


@pytest.fixture(scope="module")
def model() -> VAE:
    torch.manual_seed(0)
    return VAE(hidden_dims=[8, 16], latent_dim=4).eval()


@pytest.mark.parametrize("binarize", ["none", "static"])
def test_scores_average_to_the_evaluations_figures_on_the_same_images(model, binarize):
    images = torch.from_numpy(make_digits(120, 3)[0])
    metrics = evaluate(model, Split(images, torch.zeros(120, dtype=torch.long)), binarize=binarize, k=8,
                       probe=False, fid=False, batch_size=50, seed=5)
    scores = anomaly_scores(model, images, "bce", binarize, k=8, seed=5, batch_size=50)
    assert float(scores["nelbo"].mean()) == pytest.approx(metrics["test/nelbo"], rel=1e-6)
    assert float(scores["iw_bound"].mean()) == pytest.approx(metrics["test/iw_nll_k8"], rel=1e-9)
    assert torch.allclose(scores["nelbo"], scores["recon"] + scores["kl"])
    # The correction is taken from the tightest bound computed: the IW bound, else the negative ELBO.
    assert torch.equal(scores["complexity_corrected"], complexity_corrected(scores["iw_bound"], images))
    elbo_only = anomaly_scores(model, images, "bce", binarize, k=0, seed=5, batch_size=50)
    assert "iw_bound" not in elbo_only and torch.equal(elbo_only["nelbo"], scores["nelbo"])
    assert torch.equal(elbo_only["complexity_corrected"], complexity_corrected(scores["nelbo"], images))
    # Floats in [0, 1] score as the grey levels they came from.
    again = anomaly_scores(model, images.float().div(255).unsqueeze(1), "bce", binarize, k=8, seed=5, batch_size=50)
    assert torch.equal(again["iw_bound"], scores["iw_bound"])


def test_complexity_is_the_zlib_length_in_nats_and_ranks_noise_above_a_blank_image():
    blank, noise = torch.zeros(1, 28, 28, dtype=torch.uint8), torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    lengths = complexity_nats(torch.cat([blank, noise]))
    assert lengths[0] == pytest.approx(8 * math.log(2) * len(zlib.compress(bytes(784), 9)))
    assert lengths[1] > 10 * lengths[0]
    nll = torch.tensor([100.0, 100.0])
    assert torch.allclose(complexity_corrected(nll, torch.cat([blank, noise])), nll.double() - lengths)


def test_auroc_is_the_probability_an_outlier_outscores_an_inlier():
    rng = np.random.default_rng(0)
    inl, out = rng.integers(0, 5, 30).astype(float), rng.integers(2, 8, 20).astype(float)
    pairs = [(1.0 if o > i else 0.5 if o == i else 0.0) for i, o in itertools.product(inl, out)]
    assert auroc(torch.from_numpy(inl), torch.from_numpy(out)) == pytest.approx(np.mean(pairs))
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0


def test_read_images_from_idx_npy_and_png_folders(tmp_path):
    images = make_digits(5, 0)[0]
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f32.npy", (images.astype(np.float32) / 255)[:, None])
    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "pngs" / f"{i}.png")
    for name in ("x-idx3-ubyte.gz", "u8.npy", "f32.npy", "pngs"):
        got, digest = read_images(tmp_path / name)
        assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(images)), name
        assert len(digest) == 64


def _bad_files(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((3, 32, 32), np.uint8))
    np.save(tmp_path / "nan.npy", np.full((2, 28, 28), np.nan, np.float32))
    np.save(tmp_path / "text.npy", np.full((2, 28, 28), "a"))
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    (tmp_path / "short-idx3-ubyte").write_bytes(idx_bytes(make_digits(3, 0)[0])[:-10])
    (tmp_path / "pngs").mkdir()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "pngs" / "big.png")
    (tmp_path / "empty").mkdir()
    return {"missing.npy": "no such file", "shape.npy": "expected images of shape", "nan.npy": "NaN or infinite",
            "text.npy": "dtype", "broken.npy": "not a readable .npy", "short-idx3-ubyte": "truncated",
            "pngs": "30x30 pixels, expected 28x28", "empty": "no .png files"}


def test_bad_files_are_one_error_naming_the_file_and_the_problem(tmp_path):
    for name, problem in _bad_files(tmp_path).items():
        with pytest.raises(ImageFileError, match=problem) as caught:
            read_images(tmp_path / name)
        assert name in str(caught.value)
