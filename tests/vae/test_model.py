"""vae.model.VAE: shapes for any number of stages and image size, output range, the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks._reference import plain_layer, plain_twin
from vae.model import VAE, Conv2d, ConvTranspose2d, Linear, OutputConv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("hidden_dims", [[8], [8, 16], [8, 16, 32], [8, 16, 32, 64]])
def test_output_is_exactly_28x28_for_1_to_4_stages(hidden_dims):
    model = VAE(hidden_dims=hidden_dims, latent_dim=3)
    recon, mu, log_var = model(torch.rand(2, 1, 28, 28))
    assert recon.shape == (2, 1, 28, 28)
    assert mu.shape == log_var.shape == (2, 3)


@pytest.mark.parametrize("image_size, in_channels", [(32, 3), (17, 1), (64, 1), (8, 2)])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_output_matches_other_image_sizes_and_channels(image_size, in_channels, stages):
    model = VAE(in_channels=in_channels, hidden_dims=[4, 8, 8, 8][:stages], latent_dim=2, image_size=image_size)
    recon, _, _ = model(torch.rand(2, in_channels, image_size, image_size))
    assert recon.shape == (2, in_channels, image_size, image_size)


def test_default_model_is_the_seeds_architecture():
    model = VAE()
    assert (model.in_channels, model.hidden_dims, model.latent_dim, model.image_size, model.beta) == \
        (1, [32, 64, 128, 256], 128, 28, 1.0)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules()) == 4
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in model.encoder.modules()) == 4


def test_empty_hidden_dims_is_rejected():
    with pytest.raises(ValueError, match="hidden_dims"):
        VAE(hidden_dims=[])


def test_outputs_are_in_unit_interval_even_for_extreme_latents():
    model = VAE(hidden_dims=[8, 16], latent_dim=4).eval()
    with torch.no_grad():
        out = model.decode(torch.randn(16, 4) * 100)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_encode_returns_mu_and_log_var_of_latent_dim():
    mu, log_var = VAE(hidden_dims=[8, 16], latent_dim=5).encode(torch.rand(3, 1, 28, 28))
    assert mu.shape == log_var.shape == (3, 5)


def test_decode_maps_latents_to_images():
    assert VAE(hidden_dims=[8, 16], latent_dim=5).decode(torch.randn(7, 5)).shape == (7, 1, 28, 28)


def test_decode_is_sigmoid_of_decode_logits():
    model = VAE(hidden_dims=[8, 16], latent_dim=5).eval()
    z = torch.randn(3, 5)
    torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decode_logits(z)))


def test_reparameterize_has_the_posterior_mean_and_std():
    n = 200_000
    mu, log_var = torch.full((n, 2), 2.0), torch.full((n, 2), math.log(0.25))
    z = VAE.reparameterize(mu, log_var)
    assert abs(float(z.mean()) - 2.0) < 0.01
    assert abs(float(z.std()) - 0.5) < 0.01


def test_reparameterize_lets_gradients_reach_mu_and_log_var():
    mu, log_var = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)
    VAE.reparameterize(mu, log_var).pow(2).sum().backward()
    assert mu.grad is not None and log_var.grad is not None and float(log_var.grad.abs().sum()) > 0


def test_forward_with_z_returns_the_sampled_z():
    model = VAE(hidden_dims=[8, 16], latent_dim=5).eval()
    recon, mu, log_var, z = model.forward_with_z(torch.rand(3, 1, 28, 28))
    assert z.shape == mu.shape == (3, 5)
    torch.testing.assert_close(recon, model.decode(z))


def test_sample_draws_n_images():
    samples = VAE(hidden_dims=[8, 16], latent_dim=5).eval().sample(6)
    assert samples.shape == (6, 1, 28, 28)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0


def test_sample_is_reproducible_with_a_generator():
    model = VAE(hidden_dims=[8, 16], latent_dim=5).eval()
    a = model.sample(4, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_sample_does_not_track_gradients():
    assert not VAE(hidden_dims=[8], latent_dim=2).sample(2).requires_grad


# -- the layer classes: the plain layers' function, parameters and gradients -------------------------
def _outputs_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [y, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2d(1, 32, 3, stride=2, padding=1), (4, 1, 28, 28)),
    (lambda: Conv2d(64, 128, 3, stride=2, padding=1), (4, 64, 7, 7)),
    (lambda: ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), (4, 64, 7, 7)),
    (lambda: ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=0), (4, 128, 4, 4)),
    (lambda: OutputConv(32, 1, 3), (4, 32, 28, 28)),
    (lambda: OutputConv(8, 3, 5), (3, 8, 9, 11)),  # RGB output, a 5×5 kernel, a non-square image
    (lambda: Conv2d(4, 6, 3, padding=1, bias=False), (2, 4, 5, 5)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_compute_the_plain_layers_function_and_gradients(make, shape, channels_last):
    torch.manual_seed(0)
    layer = make().double()
    twin = plain_layer(layer)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        layer, twin = layer.to(memory_format=torch.channels_last), twin.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for ours, plain in zip(_outputs_and_grads(layer, x), _outputs_and_grads(twin, x)):
        torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)


def test_output_conv_passes_gradcheck():
    layer = OutputConv(3, 2, 3).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda inp, weight, bias: torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (inp,)), (x, w, b))


def test_output_conv_under_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    layer, x = OutputConv(32, 1, 3), torch.randn(4, 32, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, plain_layer(layer)(x), rtol=0.05, atol=0.1)


def test_output_conv_rejects_an_even_kernel():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        OutputConv(4, 1, 4)


def test_the_model_in_plain_torch_nn_layers_is_the_same_function():
    """benchmarks/_reference.py's plain twin (what the pythae contender trains) loads our state_dict and
    computes the same images, latents and gradients, in training and in evaluation mode (float64)."""
    torch.manual_seed(0)
    ours = VAE(hidden_dims=(8, 16, 32), latent_dim=4)
    plain = plain_twin(ours)
    assert not {type(m) for m in plain.modules()} & {Conv2d, ConvTranspose2d, Linear, OutputConv}
    assert not any(m.inplace for m in plain.modules() if isinstance(m, torch.nn.LeakyReLU))
    ours, plain = ours.double(), plain.double()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    outputs = []
    for model in (ours, plain):
        torch.manual_seed(1)
        recon, mu, log_var = model(x)
        ((recon - x) ** 2).sum().backward()
        outputs.append((recon, mu, log_var))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The conv biases that feed a BatchNorm have zero gradient in exact arithmetic: both models give
    # rounding noise there, so the absolute tolerance is scaled by the largest gradient.
    scale = max(float(p.grad.abs().max()) for p in ours.parameters())
    for (name, p_ours), p_plain in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_ours.grad, p_plain.grad, rtol=1e-8, atol=1e-12 * scale, msg=name)
    ours.eval(), plain.eval()
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.decode(z), plain.decode(z), rtol=1e-10, atol=1e-10)
