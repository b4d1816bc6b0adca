"""VAE objectives: plain VAE, β-VAE with linear β annealing, β-TC-VAE (Chen et al. 2018).

Every figure is per image: reconstruction terms are summed over pixels and averaged over the
batch; KL terms are summed over latent dimensions and averaged over the batch. With the
Bernoulli (BCE) decoder the numbers are nats per image; with MSE they are squared error per image.
The functions are pure functions of tensors; the classes hold hyperparameters and schedule state.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

ReconType = Literal["mse", "bce"]
LOG_2PI = math.log(2 * math.pi)


def reconstruction_loss(recon_x: torch.Tensor, x: torch.Tensor, loss_type: ReconType = "mse") -> torch.Tensor:
    """Σ_pixels ℓ(recon_x, x), averaged over the batch.

    mse: ℓ = (recon_x − x)²;  bce: ℓ = −[x log recon_x + (1 − x) log(1 − recon_x)] (= −log p(x|z)
    for a Bernoulli decoder, nats). ``recon_x`` holds probabilities in [0, 1].
    """
    if loss_type == "mse":
        total = F.mse_loss(recon_x, x, reduction="sum")
    elif loss_type == "bce":
        try:
            total = F.binary_cross_entropy(recon_x, x, reduction="sum")
        except RuntimeError:  # torch refuses probabilities outside [0, 1]: NaN ones mean training diverged
            if torch.isfinite(recon_x).all():
                raise
            total = recon_x.sum() * float("nan")  # a NaN loss, which the trainer reports with its remedies
    else:
        raise ValueError(f"loss_type must be 'mse' or 'bce', got {loss_type!r}")
    return total / x.shape[0]


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, σ²) ‖ N(0, I)) = −½ Σ_d (1 + log σ²_d − mu²_d − σ²_d), averaged over the batch."""
    return kl_per_dimension(mu, log_var).sum()


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu, σ²) ‖ N(0, 1)) = −½ (1 + log σ² − mu² − σ²), shape of ``mu`` (no reduction)."""
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp())


def kl_per_dimension(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The KL of each latent dimension, averaged over the batch: shape (latent_dim,)."""
    return gaussian_kl(mu, log_var).mean(0)


def log_normal(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(log_var)) (no sum): −½ (log 2π + log_var + (z − mu)² / σ²)."""
    return -0.5 * (LOG_2PI + log_var + (z - mu).pow(2) * torch.exp(-log_var))


def log_px_given_z(logits: torch.Tensor, x: torch.Tensor, loss_type: ReconType) -> torch.Tensor:
    """log p(x|z) per image, shape (B,), in nats, from decoder logits (B, C, H, W).

    bce: Bernoulli, Σ [x log σ(l) + (1 − x) log(1 − σ(l))] (computed stably from logits).
    mse: Gaussian with unit variance around σ(l): −½ Σ (x − σ(l))² − (P/2) log 2π, P pixels; the
    constant puts a floor of P/2·log 2π (≈ 720.4 nats on MNIST) under every NLL of such a model.
    """
    if loss_type == "bce":
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    if loss_type == "mse":
        sq = (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(1)
        return -0.5 * sq - 0.5 * x[0].numel() * LOG_2PI
    raise ValueError(f"loss_type must be 'mse' or 'bce', got {loss_type!r}")


class VAELoss:
    """total = recon + β·KL (Kingma & Welling 2014; β = 1 gives the negative ELBO).

    Returns ``(total, recon, kl)``, each a scalar tensor per image. With ``free_bits`` λ > 0 the
    total uses Σ_d max(λ, KL_d), KL_d averaged over the batch ("free bits", Kingma et al. 2016,
    eq. 15): a dimension whose KL is under λ nats costs a constant, so the encoder may use it up
    to λ without a gradient against it. ``kl`` (and so every ELBO reported) is the true KL.
    """

    def __init__(self, beta: float = 1.0, loss_type: ReconType = "mse", free_bits: float = 0.0):
        self.beta = float(beta)
        self.loss_type = loss_type
        self.free_bits = float(free_bits)

    def __call__(self, recon_x, x, mu, log_var):
        return _weighted(self, recon_x, x, mu, log_var)

    def step(self) -> None:
        """Advance the schedule by one optimizer step (no schedule here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the plain loss has no schedule."""


def _weighted(loss, recon_x, x, mu, log_var):
    """(recon + β·KL with free bits, recon, true KL) for a loss holding ``beta``, ``loss_type`` and
    ``free_bits``: the one body of :class:`VAELoss` and :class:`BetaVAELoss`."""
    recon = reconstruction_loss(recon_x, x, loss.loss_type)
    per_dim = kl_per_dimension(mu, log_var)
    kl = per_dim.sum()
    kl_objective = per_dim.clamp(min=loss.free_bits).sum() if loss.free_bits > 0 else kl
    return recon + loss.beta * kl_objective, recon, kl


class LinearBetaSchedule:
    """β_t = β_start + (β_end − β_start)·min(t / steps, 1), t counted in optimizer steps."""

    def __init__(self, beta_start: float, beta_end: float, beta_steps: int):
        self.beta_start, self.beta_end, self.beta_steps = float(beta_start), float(beta_end), int(beta_steps)
        self.num_steps = 0

    @property
    def beta(self) -> float:
        if self.beta_steps <= 0:
            return self.beta_end
        frac = min(self.num_steps / self.beta_steps, 1.0)
        return self.beta_start + (self.beta_end - self.beta_start) * frac

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])


class BetaVAELoss(LinearBetaSchedule):
    """β-VAE (Higgins et al. 2017): total = recon + β_t·KL with β_t annealed linearly per step.

    The trainer calls :meth:`step` after each optimizer step; the step count is saved in
    checkpoints through :meth:`state_dict`. Returns ``(total, recon, kl)``; ``free_bits`` as in
    :class:`VAELoss`.
    """

    def __init__(self, beta_start: float = 0.0, beta_end: float = 4.0, beta_steps: int = 1000,
                 loss_type: ReconType = "mse", free_bits: float = 0.0):
        super().__init__(beta_start, beta_end, beta_steps)
        self.loss_type = loss_type
        self.free_bits = float(free_bits)

    def __call__(self, recon_x, x, mu, log_var):
        return _weighted(self, recon_x, x, mu, log_var)


def mss_log_weights(batch_size: int, dataset_size: int) -> torch.Tensor:
    """log W for minibatch-stratified sampling (Chen et al. 2018, appendix), shape (B, B).

    Row i: 1/N on the diagonal (the sample's own point), (N − B + 1)/(N(B − 1)) on the entry
    after it (cyclically), 1/(B − 1) elsewhere, so each row sums to 1. (The widely copied
    reference code strides down column 0 instead of the diagonal; this does not.)
    """
    b, n = batch_size, dataset_size
    w = torch.full((b, b), 1.0 / (b - 1), dtype=torch.float64)
    idx = torch.arange(b)
    w[idx, (idx + 1) % b] = (n - b + 1) / (n * (b - 1))
    w[idx, idx] = 1.0 / n
    return w.log()


def tc_decomposition(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, dataset_size: int,
                     estimator: Literal["mws", "mss"] = "mws") -> dict[str, torch.Tensor]:
    """Per-sample terms of the KL decomposition KL = MI + TC + dim-KL, each shape (B,).

    With L[i, j, d] = log q(z_i,d | x_j) over the batch:
      mws: log q(z_i) ≈ logsumexp_j Σ_d L[i,j,d] − log(N·B),
           log Π_d q(z_i,d) ≈ Σ_d [logsumexp_j L[i,j,d] − log(N·B)];
      mss: the same with logsumexp_j (log W[i,j] + …) and no constant.
    Returns ``log_qz_x``, ``log_qz``, ``log_prod_qz``, ``log_pz`` and
    ``mi = log q(z|x) − log q(z)``, ``tc = log q(z) − log Π q(z_d)``,
    ``dim_kl = log Π q(z_d) − log p(z)``, which sum exactly to log q(z|x) − log p(z).

    Note: MWS shifts TC by the constant (D − 1)·log(N·B) relative to an unnormalised sum; the
    constant has no gradient but makes logged TC values large (see ``tc_plugin``).
    """
    b = z.shape[0]
    log_qz_x = log_normal(z, mu, log_var).sum(1)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    mat = log_normal(z.unsqueeze(1), mu.unsqueeze(0), log_var.unsqueeze(0))  # (B, B, D)
    if estimator == "mws":
        const = math.log(dataset_size * b)
        log_qz = torch.logsumexp(mat.sum(2), dim=1) - const
        log_prod_qz = (torch.logsumexp(mat, dim=1) - const).sum(1)
    elif estimator == "mss":
        log_w = mss_log_weights(b, dataset_size).to(z.dtype).to(z.device)
        log_qz = torch.logsumexp(log_w + mat.sum(2), dim=1)
        log_prod_qz = torch.logsumexp(log_w.unsqueeze(2) + mat, dim=1).sum(1)
    else:
        raise ValueError(f"estimator must be 'mws' or 'mss', got {estimator!r}")
    return {
        "log_qz_x": log_qz_x, "log_qz": log_qz, "log_prod_qz": log_prod_qz, "log_pz": log_pz,
        "mi": log_qz_x - log_qz, "tc": log_qz - log_prod_qz, "dim_kl": log_prod_qz - log_pz,
    }


class DisentangledVAELoss(LinearBetaSchedule):
    """β-TC-VAE (Chen et al. 2018): total = recon + α·MI + β·TC + γ·dim-KL, batch means.

    MI, TC and dim-KL are estimated from the batch (``tc_decomposition``) with minibatch-weighted
    sampling by default; β can be annealed linearly from ``beta_start`` over ``beta_steps``
    optimizer steps (set ``beta_steps=0`` for a constant β). Called as
    ``loss_fn(recon_x, x, mu, log_var, z)``; returns ``(total, recon, kl, tc)`` where kl is the
    analytic KL(q(z|x) ‖ p(z)) and tc the estimate the objective used (MWS: shifted by
    (D − 1)·log(N·B), so it can be large; only its gradient matters).
    """

    needs_z = True  # the trainer passes the sampled z to losses that set this

    def __init__(self, beta: float = 6.0, gamma: float = 1.0, dataset_size: int = 55000,
                 alpha: float = 1.0, loss_type: ReconType = "mse", beta_start: float | None = None,
                 beta_steps: int = 0, estimator: Literal["mws", "mss"] = "mws"):
        super().__init__(beta if beta_start is None else beta_start, beta, beta_steps)
        self.gamma, self.alpha, self.dataset_size = float(gamma), float(alpha), int(dataset_size)
        self.loss_type, self.estimator = loss_type, estimator

    def __call__(self, recon_x, x, mu, log_var, z):
        recon = reconstruction_loss(recon_x, x, self.loss_type)
        terms = tc_decomposition(z, mu, log_var, self.dataset_size, self.estimator)
        mi, tc, dim_kl = terms["mi"].mean(), terms["tc"].mean(), terms["dim_kl"].mean()
        total = recon + self.alpha * mi + self.beta * tc + self.gamma * dim_kl
        return total, recon, kl_divergence(mu, log_var), tc


def build_loss(loss_cfg, model_cfg, dataset_size: int):
    """The loss object a config names: the one place that maps ``loss_type`` to a class."""
    if loss_cfg.loss_type == "vae":
        return VAELoss(beta=model_cfg.beta, loss_type=loss_cfg.reconstruction_loss_type,
                       free_bits=loss_cfg.free_bits)
    if loss_cfg.loss_type == "beta_vae":
        return BetaVAELoss(loss_cfg.beta_start, loss_cfg.beta_end, loss_cfg.beta_steps,
                           loss_type=loss_cfg.reconstruction_loss_type, free_bits=loss_cfg.free_bits)
    if loss_cfg.loss_type == "disentangled":
        return DisentangledVAELoss(beta=loss_cfg.beta_end, gamma=loss_cfg.gamma, dataset_size=dataset_size,
                                   loss_type=loss_cfg.reconstruction_loss_type, beta_start=loss_cfg.beta_start,
                                   beta_steps=loss_cfg.beta_steps, estimator=loss_cfg.tc_estimator)
    raise ValueError(f"unknown loss_type {loss_cfg.loss_type!r}")
