"""Latent health: active units, KL per dimension, the linear probe."""

from __future__ import annotations

import torch

from vae.data import ImageBatches, Split
from vae.evaluate import ACTIVE_UNIT_THRESHOLD, active_units, elbo_and_latents, linear_probe

DEAD = [1, 4]


def _model_with_dead_dims(make_vae):
    """latent_dim 6; dims 1 and 4 ignore the input (mu = 0, log_var = 0: posterior = prior)."""
    model = make_vae(latent_dim=6)
    with torch.no_grad():
        model.fc_mu.weight.mul_(20.0)  # live dims: means that clearly vary across images
        for layer in (model.fc_mu, model.fc_log_var):
            layer.weight[DEAD] = 0.0
            layer.bias[DEAD] = 0.0
    return model


def _stats(model, tiny_data):
    return elbo_and_latents(model, ImageBatches(Split(tiny_data.test_images, tiny_data.test_labels), 100,
                                                shuffle=False), "bce")


def test_active_units_count_only_dimensions_whose_mean_varies(make_vae, tiny_data):
    count, variance = active_units(_stats(_model_with_dead_dims(make_vae), tiny_data)["mu"])
    assert count == 6 - len(DEAD)
    assert (variance[DEAD] <= ACTIVE_UNIT_THRESHOLD).all()


def test_kl_of_a_dimension_whose_posterior_is_the_prior_is_zero(make_vae, tiny_data):
    kl = _stats(_model_with_dead_dims(make_vae), tiny_data)["kl_per_dim"]
    live = [d for d in range(6) if d not in DEAD]
    assert torch.allclose(kl[DEAD], torch.zeros(len(DEAD)), atol=1e-6)
    assert (kl[live] > 0.01).all()


def test_kl_per_dimension_sums_to_the_kl_per_image(make_vae, tiny_data):
    stats = _stats(make_vae(latent_dim=5), tiny_data)
    assert torch.isclose(stats["kl_per_dim"].sum(), stats["kl"].mean(), rtol=1e-5)


def test_linear_probe_classifies_separable_latents():
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, 8, generator=gen)
    labels = torch.arange(10).repeat(40)
    z = centres[labels] + 0.3 * torch.randn(400, 8, generator=gen)
    assert linear_probe(z[:300], labels[:300], z[300:], labels[300:]) > 0.95


def test_linear_probe_is_at_chance_when_latents_carry_no_label():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(100)
    z = torch.randn(1000, 8, generator=gen)
    assert linear_probe(z[:500], labels[:500], z[500:], labels[500:]) < 0.2
