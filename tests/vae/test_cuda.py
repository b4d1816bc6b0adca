"""The library on a CUDA GPU: training, resume, bf16 autocast, evaluation and sampling.

Skipped without CUDA (CI has none); run them where a GPU is, e.g.
``python -m pytest tests/vae/test_cuda.py``. Each compares the GPU against the CPU on the same
weights, so a device-specific bug shows as a mismatch rather than only as a crash.
"""

from __future__ import annotations

import pytest
import torch

from tests.vae.conftest import tiny_train_config
from vae import fast
from vae.checkpoint import load_model
from vae.data import load_dataset
from vae.likelihood import iw_nll
from vae.model import VAE
from vae.sample import VAESampler
from vae.train import VAETrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matmuls would make GPU-vs-CPU comparisons loose; the checks want float32 products."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _train(tmp_path, data_dir, **overrides):
    cfg = tiny_train_config(data_dir, tmp_path / "ckpt", device="cuda", **overrides)
    return cfg, VAETrainer(cfg).train()


def test_trains_resumes_and_loads_on_cpu(tmp_path, tiny_data_dir):
    cfg, result = _train(tmp_path, tiny_data_dir)
    assert torch.isfinite(torch.tensor(result["final_metrics"]["val/loss"]))
    # the checkpoint holds CPU-loadable tensors, and the GPU and CPU agree on its weights
    model, _ = load_model(result["best_model_path"], "cpu")
    gpu_model, _ = load_model(result["best_model_path"], "cuda")
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        mu_cpu, logvar_cpu = model.encode(x)
        mu_gpu, logvar_gpu = gpu_model.encode(x.cuda())
    torch.testing.assert_close(mu_gpu.cpu(), mu_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logvar_gpu.cpu(), logvar_cpu, rtol=1e-4, atol=1e-4)
    # resume on the GPU for a second epoch
    cfg["num_epochs"] = 2
    resumed = VAETrainer(cfg, resume=True).train()
    assert [h["epoch"] for h in resumed["history"]][-1] == 2


def test_fast_path_leaves_cuda_models_alone():
    model = VAE(hidden_dims=[8, 16], latent_dim=4).cuda()
    assert fast.accelerate(model, "cuda") is model
    assert set(fast.forms(model).values()) == {"plain"}
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules() if m is not model)


def test_bf16_autocast_trains(tmp_path, tiny_data_dir):
    _, result = _train(tmp_path, tiny_data_dir, amp=True)
    assert torch.isfinite(torch.tensor(result["final_metrics"]["val/loss"]))


@pytest.mark.parametrize("decoder", ["conv", "autoregressive"])
def test_iw_bound_agrees_with_cpu(decoder):
    torch.manual_seed(0)
    model = VAE(hidden_dims=[8, 16], latent_dim=4, decoder=decoder).eval()
    x = (torch.rand(32, 1, 28, 28) > 0.5).float()
    labels = torch.zeros(32, dtype=torch.long)
    cpu = iw_nll(model, [(x, labels)], k=64, loss_type="bce", seed=3)
    gpu = iw_nll(model.cuda(), [(x.cuda(), labels.cuda())], k=64, loss_type="bce", seed=3)
    # different random streams per device: the two estimates agree to their Monte Carlo error
    assert abs(cpu - gpu) < 0.02 * abs(cpu)


def test_sampler_on_cuda(trained_checkpoint):
    sampler = VAESampler(trained_checkpoint, device="cuda")
    images = sampler.sample_random(16)
    assert images.device.type == "cpu" and images.shape == (16, 1, 28, 28)
    assert 0 <= images.min() and images.max() <= 1
    grid = sampler.generate_latent_grid(4)
    assert grid.shape == (16, 1, 28, 28)


def test_data_loads_to_cuda(tiny_data_dir):
    data = load_dataset(tiny_data_dir, download=False)
    batch = data.train_images[:64].cuda()
    assert batch.is_cuda and batch.dtype in (torch.uint8, torch.float32)
