"""vae.model.VAE: shapes for any number of stages and image size, output range, the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from vae.model import VAE


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


@pytest.mark.parametrize("decoder, ar_layers", [("conv", 1), ("autoregressive", 1), ("autoregressive", 3)])
def test_the_model_is_built_from_plain_torch_nn_layers(decoder, ar_layers):
    model = VAE(hidden_dims=[8, 16], latent_dim=2, decoder=decoder, ar_layers=ar_layers)
    layers = {type(m) for m in model.modules() if not list(m.children()) and not isinstance(m, torch.nn.ModuleList)}
    assert layers <= {torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.BatchNorm2d,
                      torch.nn.LeakyReLU}
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules()
               if m is not model and type(m).__module__ != "vae.autoregressive")  # the head and its layers
