"""vae.losses against closed forms and brute-force loops (float64 where the maths is exact)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from vae.config import ConfigError, validate_config
from vae.losses import (BetaVAELoss, DisentangledVAELoss, LinearBetaSchedule, VAELoss, build_loss, kl_divergence,
                        kl_per_dimension, log_normal, log_px_given_z, mss_log_weights, reconstruction_loss,
                        tc_decomposition)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _batch(gen, b=5, d=3, dtype=torch.float64):
    mu = torch.randn(b, d, generator=gen, dtype=dtype)
    log_var = torch.randn(b, d, generator=gen, dtype=dtype) * 0.5
    z = mu + torch.exp(0.5 * log_var) * torch.randn(b, d, generator=gen, dtype=dtype)
    return z, mu, log_var


def _images(gen, b=4):
    x = torch.rand(b, 1, 6, 6, generator=gen, dtype=torch.float64)
    recon = torch.rand(b, 1, 6, 6, generator=gen, dtype=torch.float64).clamp(0.01, 0.99)
    return recon, x


# -- closed forms and brute force -------------------------------------------------------------
def test_kl_matches_torch_distributions(gen):
    _, mu, log_var = _batch(gen, b=6, d=4)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mu, log_var), expected)


def test_kl_is_zero_at_the_prior():
    assert float(kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4))) == 0.0


def test_kl_per_dimension_sums_to_the_kl(gen):
    _, mu, log_var = _batch(gen)
    per_dim = kl_per_dimension(mu, log_var)
    assert per_dim.shape == (3,)
    torch.testing.assert_close(per_dim.sum(), kl_divergence(mu, log_var))


def test_mse_matches_brute_force(gen):
    recon, x = _images(gen)
    per_image = [sum((float(recon[i].flatten()[p]) - float(x[i].flatten()[p])) ** 2 for p in range(36))
                 for i in range(4)]
    assert reconstruction_loss(recon, x, "mse").item() == pytest.approx(sum(per_image) / 4, rel=1e-12)


def test_bce_matches_brute_force(gen):
    recon, x = _images(gen)
    per_image = []
    for i in range(4):
        r, t = recon[i].flatten().tolist(), x[i].flatten().tolist()
        per_image.append(-sum(tp * math.log(rp) + (1 - tp) * math.log(1 - rp) for rp, tp in zip(r, t)))
    assert reconstruction_loss(recon, x, "bce").item() == pytest.approx(sum(per_image) / 4, rel=1e-12)


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_reconstruction_sums_pixels_and_averages_the_batch(gen, kind):
    recon, x = _images(gen, b=1)
    one = reconstruction_loss(recon, x, kind)
    # four copies of the same image: the mean over the batch is unchanged
    torch.testing.assert_close(reconstruction_loss(recon.repeat(4, 1, 1, 1), x.repeat(4, 1, 1, 1), kind), one)
    # the same image twice as large: the sum over pixels doubles
    torch.testing.assert_close(reconstruction_loss(recon.repeat(1, 1, 2, 1), x.repeat(1, 1, 2, 1), kind), 2 * one)


def test_unknown_reconstruction_type_is_rejected(gen):
    recon, x = _images(gen)
    with pytest.raises(ValueError, match="loss_type must be 'mse' or 'bce'"):
        reconstruction_loss(recon, x, "l1")  # type: ignore[arg-type]


def test_log_normal_matches_torch_distributions(gen):
    z, mu, log_var = _batch(gen)
    expected = Normal(mu, torch.exp(0.5 * log_var)).log_prob(z)
    torch.testing.assert_close(log_normal(z, mu, log_var), expected)


def test_log_px_given_z_bernoulli_matches_brute_force(gen):
    logits = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64) * 3
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64), generator=gen)
    expected = []
    for i in range(3):
        total = 0.0
        for l_val, t in zip(logits[i].flatten().tolist(), x[i].flatten().tolist()):
            p = 1 / (1 + math.exp(-l_val))
            total += t * math.log(p) + (1 - t) * math.log(1 - p)
        expected.append(total)
    torch.testing.assert_close(log_px_given_z(logits, x, "bce"), torch.tensor(expected, dtype=torch.float64))


def test_log_px_given_z_gaussian_matches_brute_force(gen):
    logits = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    expected = []
    for i in range(3):
        total = 0.0
        for l_val, t in zip(logits[i].flatten().tolist(), x[i].flatten().tolist()):
            m = 1 / (1 + math.exp(-l_val))
            total += -0.5 * math.log(2 * math.pi) - 0.5 * (t - m) ** 2
        expected.append(total)
    torch.testing.assert_close(log_px_given_z(logits, x, "mse"), torch.tensor(expected, dtype=torch.float64))


def test_gaussian_log_px_has_the_mnist_floor():
    x = torch.full((1, 1, 28, 28), 0.5)
    perfect = log_px_given_z(torch.zeros(1, 1, 28, 28), x, "mse")  # sigmoid(0) = 0.5 = x
    assert -float(perfect) == pytest.approx(392 * math.log(2 * math.pi), abs=1e-3)  # ≈ 720.4 nats


# -- the loss classes ---------------------------------------------------------------------------
def test_vae_loss_is_recon_plus_beta_kl(gen):
    recon, x = _images(gen)
    _, mu, log_var = _batch(gen, b=4)
    total, rec, kl = VAELoss(beta=2.5, loss_type="bce")(recon, x, mu, log_var)
    torch.testing.assert_close(rec, reconstruction_loss(recon, x, "bce"))
    torch.testing.assert_close(kl, kl_divergence(mu, log_var))
    torch.testing.assert_close(total, rec + 2.5 * kl)


def test_free_bits_floor_each_dimensions_batch_mean_kl(gen):
    recon, x = _images(gen)
    mu = torch.tensor([[0.0, 1.0, 0.1], [0.0, 2.0, -0.1], [0.0, 0.5, 0.2], [0.0, 1.5, 0.0]], dtype=torch.float64)
    log_var = torch.zeros_like(mu)
    per_dim = (0.5 * mu.pow(2)).mean(0)  # KL_d with σ = 1: ½ μ², batch mean: 0, 0.9375, 0.0075
    for loss_fn in (VAELoss(beta=2.0, loss_type="bce", free_bits=0.05),
                    BetaVAELoss(beta_start=2.0, beta_end=2.0, beta_steps=0, loss_type="bce", free_bits=0.05)):
        total, rec, kl = loss_fn(recon, x, mu, log_var)
        torch.testing.assert_close(kl, per_dim.sum())  # the reported KL is the true one
        torch.testing.assert_close(total, rec + 2.0 * (0.05 + 0.9375 + 0.05))


def test_free_bits_stop_the_kl_gradient_of_dimensions_under_the_floor_only(gen):
    _, mu, log_var = _batch(gen, b=6, d=4)
    mu = mu * torch.tensor([0.05, 1.0, 0.02, 2.0], dtype=torch.float64)
    log_var = (log_var * 0.01).requires_grad_()
    mu.requires_grad_()
    per_dim = kl_per_dimension(mu, log_var)
    under = per_dim.detach() < 0.1
    assert under.tolist() == [True, False, True, False]  # the case the test is about
    recon, x = _images(gen, b=6)
    VAELoss(loss_type="bce", free_bits=0.1)(recon, x, mu, log_var)[0].backward()
    free_mu, free_lv = mu.grad.clone(), log_var.grad.clone()
    mu.grad = log_var.grad = None
    VAELoss(loss_type="bce")(recon, x, mu, log_var)[0].backward()
    assert torch.count_nonzero(free_mu[:, under]) == 0 and torch.count_nonzero(free_lv[:, under]) == 0
    torch.testing.assert_close(free_mu[:, ~under], mu.grad[:, ~under])
    torch.testing.assert_close(free_lv[:, ~under], log_var.grad[:, ~under])
    assert torch.count_nonzero(mu.grad[:, under]) > 0  # without free bits the same dimensions are pulled


def test_free_bits_zero_is_the_plain_objective(gen):
    recon, x = _images(gen)
    _, mu, log_var = _batch(gen, b=4)
    a, b = VAELoss(beta=1.5, loss_type="bce")(recon, x, mu, log_var), VAELoss(1.5, "bce", 0.0)(recon, x, mu, log_var)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_free_bits_is_refused_with_the_disentangled_loss():
    with pytest.raises(ConfigError, match="free_bits: applies to the 'vae' and 'beta_vae' losses"):
        validate_config({"loss_type": "disentangled", "free_bits": 0.1})
    with pytest.raises(ConfigError, match="free_bits: must be >= 0"):
        validate_config({"free_bits": -0.5})
    cfg = validate_config({"loss_type": "beta_vae", "free_bits": 0.25})
    assert build_loss(cfg.loss, cfg.model, dataset_size=10).free_bits == 0.25


def test_beta_schedule_is_linear_in_steps():
    sched = LinearBetaSchedule(beta_start=1.0, beta_end=5.0, beta_steps=8)
    seen = []
    for _ in range(11):
        seen.append(sched.beta)
        sched.step()
    assert seen == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.0, 5.0]


def test_beta_schedule_with_zero_steps_is_constant():
    assert LinearBetaSchedule(0.0, 3.0, 0).beta == 3.0


def test_beta_vae_loss_uses_the_current_beta(gen):
    recon, x = _images(gen)
    _, mu, log_var = _batch(gen, b=4)
    loss_fn = BetaVAELoss(beta_start=0.0, beta_end=4.0, beta_steps=4)
    total0, rec, kl = loss_fn(recon, x, mu, log_var)
    torch.testing.assert_close(total0, rec)
    loss_fn.step()
    torch.testing.assert_close(loss_fn(recon, x, mu, log_var)[0], rec + 1.0 * kl)


def test_beta_schedule_state_dict_round_trips():
    a = BetaVAELoss(beta_start=0.0, beta_end=4.0, beta_steps=100)
    for _ in range(37):
        a.step()
    b = BetaVAELoss(beta_start=0.0, beta_end=4.0, beta_steps=100)
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 37 and b.beta == a.beta == pytest.approx(1.48)


# -- β-TC-VAE -----------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_decomposition_sums_exactly_to_the_monte_carlo_kl(gen, estimator):
    z, mu, log_var = _batch(gen, b=8, d=4)
    t = tc_decomposition(z, mu, log_var, dataset_size=1000, estimator=estimator)
    torch.testing.assert_close(t["mi"] + t["tc"] + t["dim_kl"], t["log_qz_x"] - t["log_pz"], rtol=0, atol=1e-12)
    for key in ("mi", "tc", "dim_kl", "log_qz", "log_prod_qz"):
        assert t[key].shape == (8,)


def test_mws_log_qz_matches_brute_force(gen):
    b, d, n = 5, 3, 1000
    z, mu, log_var = _batch(gen, b=b, d=d)
    t = tc_decomposition(z, mu, log_var, dataset_size=n, estimator="mws")
    std = torch.exp(0.5 * log_var)

    def density(i, j, dims):  # q(z_i[dims] | x_j)
        return math.prod(math.exp(float(Normal(mu[j, k], std[j, k]).log_prob(z[i, k]))) for k in dims)

    for i in range(b):
        log_qz = math.log(sum(density(i, j, range(d)) for j in range(b)) / (n * b))
        log_prod = sum(math.log(sum(density(i, j, [k]) for j in range(b)) / (n * b)) for k in range(d))
        assert float(t["log_qz"][i]) == pytest.approx(log_qz, rel=1e-10)
        assert float(t["log_prod_qz"][i]) == pytest.approx(log_prod, rel=1e-10)


def test_mws_tc_is_shifted_by_d_minus_1_log_nb(gen):
    b, d, n = 6, 4, 500
    z, mu, log_var = _batch(gen, b=b, d=d)
    t = tc_decomposition(z, mu, log_var, dataset_size=n, estimator="mws")
    mat = log_normal(z.unsqueeze(1), mu.unsqueeze(0), log_var.unsqueeze(0))
    unnormalised = torch.logsumexp(mat.sum(2), 1) - torch.logsumexp(mat, 1).sum(1)
    torch.testing.assert_close(t["tc"], unnormalised + (d - 1) * math.log(n * b))


def test_mss_weights_have_1_over_n_on_the_diagonal_and_rows_summing_to_1():
    b, n = 7, 1000
    w = mss_log_weights(b, n).exp()
    torch.testing.assert_close(torch.diagonal(w), torch.full((b,), 1 / n, dtype=torch.float64))
    torch.testing.assert_close(w.sum(1), torch.ones(b, dtype=torch.float64))


def test_mss_weights_off_diagonal_entries():
    b, n = 5, 100
    w = mss_log_weights(b, n).exp()
    strat = (n - b + 1) / (n * (b - 1))
    for i in range(b):
        others = sorted(float(w[i, j]) for j in range(b) if j != i)
        assert others == pytest.approx(sorted([strat] + [1 / (b - 1)] * (b - 2)))


def test_unknown_tc_estimator_is_rejected(gen):
    z, mu, log_var = _batch(gen)
    with pytest.raises(ValueError, match="estimator"):
        tc_decomposition(z, mu, log_var, 100, estimator="exact")  # type: ignore[arg-type]


def test_disentangled_loss_is_recon_plus_mi_plus_beta_tc_plus_gamma_dimkl(gen):
    recon, x = _images(gen, b=5)
    z, mu, log_var = _batch(gen, b=5, d=3)
    loss_fn = DisentangledVAELoss(beta=6.0, gamma=2.0, dataset_size=300, loss_type="bce")
    total, rec, kl, tc = loss_fn(recon, x, mu, log_var, z)
    t = tc_decomposition(z, mu, log_var, 300)
    torch.testing.assert_close(tc, t["tc"].mean())
    torch.testing.assert_close(kl, kl_divergence(mu, log_var))
    torch.testing.assert_close(total, rec + t["mi"].mean() + 6.0 * t["tc"].mean() + 2.0 * t["dim_kl"].mean())


def test_disentangled_loss_anneals_beta_when_asked():
    loss_fn = DisentangledVAELoss(beta=6.0, beta_start=0.0, beta_steps=3)
    betas = []
    for _ in range(4):
        betas.append(loss_fn.beta)
        loss_fn.step()
    assert betas == [0.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("loss_type, cls", [("vae", VAELoss), ("beta_vae", BetaVAELoss),
                                            ("disentangled", DisentangledVAELoss)])
def test_build_loss_maps_loss_type_to_its_class(loss_type, cls):
    cfg = validate_config({"loss_type": loss_type, "reconstruction_loss_type": "bce", "beta_end": 3.0})
    loss_fn = build_loss(cfg.loss, cfg.model, dataset_size=1234)
    assert type(loss_fn) is cls and loss_fn.loss_type == "bce"
    if cls is DisentangledVAELoss:
        assert loss_fn.dataset_size == 1234 and loss_fn.beta_end == 3.0


def test_bce_of_diverged_probabilities_is_a_nan_loss_not_a_torch_error():
    """NaN decoder outputs (training diverged) give a NaN loss the trainer reports with its remedies;
    torch's own check would raise 'all elements of input should be between 0 and 1' instead."""
    x = torch.rand(2, 1, 4, 4).round()
    probs = torch.full((2, 1, 4, 4), 0.3, requires_grad=True)
    assert torch.isclose(reconstruction_loss(probs, x, "bce"),
                         torch.nn.functional.binary_cross_entropy(probs, x, reduction="sum") / 2)
    diverged = probs.detach().clone()
    diverged[0, 0, 0, 0] = float("nan")
    diverged.requires_grad_(True)
    loss = reconstruction_loss(diverged, x, "bce")
    assert torch.isnan(loss)
    loss.backward()  # the trainer steps before its periodic NaN check: the graph must stay usable
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # finite but invalid probabilities still fail
        reconstruction_loss(torch.full((2, 1, 4, 4), 1.5), x, "bce")
