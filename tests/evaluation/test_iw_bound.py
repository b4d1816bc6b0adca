"""The importance-weighted bound: exact against brute force, a bound, tighter with k, bounded memory."""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Normal

from vae.data import ImageBatches, Split, static_binarize
from vae.evaluate import elbo_and_latents, iw_bound, iw_log_weights, iw_nll


def _binary_batch(tiny_data, n: int) -> torch.Tensor:
    return static_binarize(tiny_data.test_images[:n], seed=0).unsqueeze(1).float().div(255)


def _brute_force(model, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log w for each image b and noise draw eps[s, b], one image and one sample at a time, with
    torch.distributions: shape (B, S)."""
    out = torch.empty(x.shape[0], eps.shape[0])
    with torch.no_grad():
        mu, log_var = model.encode(x)
        std = torch.exp(0.5 * log_var)
        for b in range(x.shape[0]):
            for s in range(eps.shape[0]):
                z = mu[b] + std[b] * eps[s, b]
                logits = model.decode_logits(z.unsqueeze(0))[0]
                out[b, s] = (Bernoulli(logits=logits).log_prob(x[b]).sum() + Normal(0.0, 1.0).log_prob(z).sum()
                             - Normal(mu[b], std[b]).log_prob(z).sum())
    return out


def test_iw_log_weights_equal_a_per_sample_brute_force(make_vae, tiny_data):
    model, x = make_vae(latent_dim=3), _binary_batch(tiny_data, 5)
    # chunk = 5 images x 7 samples: one pass, so the noise is one (7, 5, 3) draw from the generator.
    log_w = iw_log_weights(model, x, k=7, loss_type="bce", chunk=35, generator=torch.Generator().manual_seed(1))
    eps = torch.randn((7, 5, 3), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(log_w, _brute_force(model, x, eps), atol=1e-3)


def test_iw_log_weights_put_each_pass_in_its_own_columns(make_vae, tiny_data):
    model, x = make_vae(latent_dim=3), _binary_batch(tiny_data, 5)
    # chunk = 15 images = 3 samples of 5 images: passes of 3, 3 and 1 samples, one draw each.
    log_w = iw_log_weights(model, x, k=7, loss_type="bce", chunk=15, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    eps = torch.cat([torch.randn((n, 5, 3), generator=gen) for n in (3, 3, 1)])
    assert log_w.shape == (5, 7)
    assert torch.allclose(log_w, _brute_force(model, x, eps), atol=1e-3)


def test_iw_bound_converges_to_the_exact_nll_of_a_one_dimensional_latent(make_vae, tiny_data):
    model, x = make_vae(latent_dim=1, seed=3), _binary_batch(tiny_data, 3)
    # Exact −log p(x) by quadrature over z: p(x) = ∫ p(x|z) p(z) dz on a fine grid.
    z = torch.linspace(-10, 10, 4001).unsqueeze(1)
    with torch.no_grad():
        logits = model.decode_logits(z)
    exact = []
    for b in range(3):
        log_joint = (-torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x[b].expand_as(logits), reduction="none").flatten(1).sum(1) + Normal(0.0, 1.0).log_prob(z[:, 0]))
        exact.append(-(torch.logsumexp(log_joint.double(), 0) + math.log(20 / 4000)))
    exact = torch.stack(exact)
    bound = iw_bound(model, [(x, None)], k=2000, loss_type="bce", seed=0)
    assert torch.allclose(bound, exact, atol=0.05), (bound, exact)


def _test_batches(tiny_data, n: int = 100) -> ImageBatches:
    return ImageBatches(Split(static_binarize(tiny_data.test_images[:n], 0), tiny_data.test_labels[:n]), n,
                        shuffle=False)


def test_iw_bound_is_below_the_negative_elbo(tiny_model, tiny_data):
    batches = _test_batches(tiny_data)
    stats = elbo_and_latents(tiny_model, batches, "bce")
    nelbo = float((stats["recon"] + stats["kl"]).mean())
    assert iw_nll(tiny_model, batches, k=20, loss_type="bce") < nelbo - 0.1


def test_iw_bound_tightens_as_k_grows(tiny_model, tiny_data):
    batches = _test_batches(tiny_data)
    values = [iw_nll(tiny_model, batches, k=k, loss_type="bce", seed=0) for k in (1, 8, 64)]
    assert values[0] > values[1] > values[2], values


def test_iw_bound_decodes_at_most_chunk_images_per_pass(make_vae, tiny_data):
    model, x = make_vae(), _binary_batch(tiny_data, 8)
    sizes = []
    hook = model.decoder_input.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    log_w = iw_log_weights(model, x, k=100, loss_type="bce", chunk=64)
    hook.remove()
    assert log_w.shape == (8, 100)
    assert max(sizes) <= 64 and sum(sizes) == 8 * 100


def test_iw_bound_of_the_mse_decoder_includes_the_gaussian_floor(make_vae, tiny_data):
    model = make_vae()
    x = tiny_data.test_images[:4].unsqueeze(1).float().div(255)
    floor = 0.5 * 784 * math.log(2 * math.pi)  # ≈ 720.4 nats
    assert iw_nll(model, [(x, None)], k=5, loss_type="mse") > floor
