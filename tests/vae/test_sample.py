"""vae.sample: VAESampler on a trained tiny checkpoint (latent_dim 4) and the sampling CLI."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vae.sample import VAESampler, cli
from vae.utils import CheckpointError


@pytest.fixture(scope="module")
def sampler(trained_checkpoint):
    return VAESampler(trained_checkpoint, seed=0)


def test_sampler_rebuilds_the_model_from_the_checkpoint(sampler):
    assert sampler.latent_dim == 4 and sampler.model.hidden_dims == [8, 16]
    assert not sampler.model.training


def test_sample_random_shape_and_range(sampler):
    x = sampler.sample_random(6)
    assert x.shape == (6, 1, 28, 28)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_samplers_with_the_same_seed_agree(trained_checkpoint):
    a, b = VAESampler(trained_checkpoint, seed=5), VAESampler(trained_checkpoint, seed=5)
    torch.testing.assert_close(a.sample_random(3), b.sample_random(3))


def test_latent_grid_is_n_by_n(sampler):
    assert sampler.generate_latent_grid(num_samples=5).shape == (25, 1, 28, 28)


def test_latent_grid_varies_two_dimensions_over_the_range(sampler):
    grid = sampler.generate_latent_grid(num_samples=3, dims=(1, 2), latent_range=(-2.0, 2.0))
    # bottom-left corner: dim 1 at the minimum, dim 2 at the minimum, the others at 0
    corner = sampler.decode(torch.tensor([[0.0, -2.0, -2.0, 0.0]]))
    torch.testing.assert_close(grid[6:7], corner, rtol=1e-4, atol=1e-5)


def test_latent_traversal_has_one_row_per_dimension(sampler):
    assert sampler.latent_traversal(num_steps=7).shape == (4 * 7, 1, 28, 28)  # default: every dim (<= 10)
    assert sampler.latent_traversal(dims=[0, 3], num_steps=5).shape == (10, 1, 28, 28)


def test_latent_traversal_starts_from_base_z(sampler):
    base = torch.tensor([0.5, -0.5, 1.0, 0.0])
    out = sampler.latent_traversal(dims=[0], num_steps=3, latent_range=(-1.0, 1.0), base_z=base)
    torch.testing.assert_close(out[2:3], sampler.decode(torch.tensor([[1.0, -0.5, 1.0, 0.0]])), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_endpoints_decode_z1_and_z2(sampler, method):
    z1, z2 = torch.randn(1, 4), torch.randn(1, 4)
    path = sampler.interpolate_latent(z1, z2, num_steps=6, method=method)
    assert path.shape == (6, 1, 28, 28)
    torch.testing.assert_close(path[:1], sampler.decode(z1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(path[-1:], sampler.decode(z2), rtol=1e-4, atol=1e-5)


def test_unknown_interpolation_method_is_rejected(sampler):
    with pytest.raises(ValueError, match="'linear' or 'slerp'"):
        sampler.interpolate_latent(torch.zeros(4), torch.ones(4), method="cubic")


def test_reconstruct_decodes_the_posterior_mean(sampler):
    x = torch.rand(3, 1, 28, 28)
    recon = sampler.reconstruct(x)
    assert recon.shape == (3, 1, 28, 28)
    with torch.no_grad():
        mu, _ = sampler.model.encode(x)
    torch.testing.assert_close(recon, sampler.decode(mu))


def test_save_helpers_write_readable_titled_grids(sampler, tmp_path):
    grid = sampler.save_latent_grid(sampler.generate_latent_grid(num_samples=3), tmp_path / "g" / "grid.png")
    line = sampler.save_interpolation(sampler.interpolate_latent(torch.zeros(4), torch.ones(4), 5), tmp_path / "i.png",
                                      title="from zeros to ones")
    # 3 cells of 28 px + 2 px padding = 92 px, upscaled 7x (nearest) to reach 600 px; the title above.
    width, height = Image.open(grid).size
    assert width == 92 * 7 and height > 92 * 7
    assert Image.open(grid).text["Title"] == "latent grid: 3×3 images over z0 (across) and z1 (down)"
    assert Image.open(line).size[0] == (5 * 30 + 2) * 4
    assert Image.open(line).text["Title"] == "from zeros to ones"


def test_cli_writes_the_pngs(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    with pytest.raises(SystemExit) as info:
        cli(["--model_path", str(trained_checkpoint), "--output_dir", str(out), "--num_samples", "9",
             "--grid_size", "3", "--num_steps", "4", "--latent_range_min", "-4", "--latent_range_max", "4"])
    assert info.value.code == 0
    names = {"samples.png", "latent_grid.png", "traversal.png", "interpolation.png"}
    assert {p.name for p in out.iterdir()} == names
    assert all(Image.open(out / n).size[0] >= 600 for n in names)
    assert Image.open(out / "latent_grid.png").size[0] == 92 * 7
    assert Image.open(out / "traversal.png").size[0] == (4 * 30 + 2) * 5  # 4 steps across
    titles = {n: Image.open(out / n).text["Title"] for n in names}
    assert titles["samples.png"] == "9 samples from the prior, z ~ N(0, I)"
    assert titles["traversal.png"].startswith("latent traversal of dims 0–3 (one per row), -4…4 in 4 steps")
    assert "-4…4" in titles["latent_grid.png"] and "interpolation" in titles["interpolation.png"]
    assert set(capsys.readouterr().out.split()) == {str(out / n) for n in names}


def test_cli_missing_model_path_exits_2_with_a_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--model_path", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err and "nope.pth" in err
    assert not (tmp_path / "out").exists()


def test_cli_garbage_model_file_exits_2_with_a_clear_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(SystemExit) as info:
        cli(["--model_path", str(garbage)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "garbage.pth" in err


def test_cli_bad_range_exits_2(trained_checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--model_path", str(trained_checkpoint), "--latent_range_min", "3", "--latent_range_max", "-3"])
    assert info.value.code == 2
    assert "--latent_range_min must be below --latent_range_max" in capsys.readouterr().err


class Payload:
    """An arbitrary object: unpickling it needs code, so weights_only loading refuses it."""


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": 1, "config": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        VAESampler(path)


def test_a_checkpoint_of_another_shape_is_rejected(trained_checkpoint, tmp_path):
    from vae.utils import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained_checkpoint)
    state["config"]["latent_dim"] = 7
    save_checkpoint(state, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="not a usable VAE checkpoint"):
        VAESampler(tmp_path / "mismatch.pth")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_unavailable_device_exits_2_with_one_line(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--model_path", str(trained_checkpoint), "--device", "cuda", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device: 'cuda'" in err and "--device auto or cpu" in err
