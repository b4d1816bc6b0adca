"""The convolutional VAE: a stride-2 CNN encoder to (mu, log_var), a transposed-CNN decoder.

A pure ``nn.Module`` built from plain ``torch.nn`` layers: no logging, files, device choice or
config parsing. The decoder mirrors the encoder's spatial sizes exactly, so any number of
stages returns ``image_size`` pixels. Faster forms of the same layers for the CPU live in
:mod:`vae.fast`, which swaps them in (``vae.fast.accelerate(model)``) with the same parameters.

Two decoders:

- ``'conv'`` (default, the seed's): pixels independent given z, p(x|z) = Π_i p(x_i|z).
- ``'autoregressive'``: p(x|z) = Π_i p(x_i | z, x_<i), each pixel also given the causal k×k
  neighbourhood of the pixels before it (:class:`vae.autoregressive.LocalAutoregressiveHead`).

``use_latent=False`` is the ablation that shows what z adds: the same network with z removed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vae.autoregressive import LocalAutoregressiveHead

__all__ = ["VAE"]


def _conv_out(size: int) -> int:
    """Spatial size after Conv2d(kernel 3, stride 2, padding 1)."""
    return (size - 1) // 2 + 1


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    """conv -> BatchNorm -> LeakyReLU(0.2): one stage of the encoder or decoder."""
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))


class VAE(nn.Module):
    """Convolutional variational autoencoder with a diagonal-Gaussian posterior.

    Args:
        in_channels: image channels.
        hidden_dims: channels of each stride-2 encoder stage; the decoder runs them in reverse.
        latent_dim: dimension of z.
        image_size: height and width of input and output images.
        beta: KL weight, kept for callers that build the plain loss from the model.
        decoder: ``'conv'`` (pixels independent given z) or ``'autoregressive'`` (each pixel also
            given the k×k causal neighbourhood of the pixels before it; Bernoulli likelihood).
        ar_channels, ar_kernel, ar_layers: width, window size and depth of the autoregressive head.
        use_latent: ``False`` removes z (the ablation): ``encode`` returns q(z|x) = p(z) = N(0, I)
            and the decoder gets z = 0, so the KL term is 0, every bound equals log p(x) exactly and
            the model is its decoder alone. The encoder's weights stay (same state_dict) but unused.
    """

    def __init__(self, in_channels: int = 1, hidden_dims: Sequence[int] = (32, 64, 128, 256),
                 latent_dim: int = 128, image_size: int = 28, beta: float = 1.0, decoder: str = "conv",
                 ar_channels: int = 32, ar_kernel: int = 7, use_latent: bool = True, ar_layers: int = 1):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one stage")
        if decoder not in ("conv", "autoregressive"):
            raise ValueError(f"decoder must be 'conv' or 'autoregressive', got {decoder!r}")
        self.in_channels, self.latent_dim, self.image_size, self.beta = in_channels, latent_dim, image_size, beta
        self.hidden_dims, self.use_latent = hidden_dims, use_latent

        # Spatial size after each stage, e.g. 28 -> [14, 7, 4, 2] for four stages.
        sizes = [image_size]
        for _ in hidden_dims:
            sizes.append(_conv_out(sizes[-1]))
        self._bottom = sizes[-1]
        flat = hidden_dims[-1] * self._bottom ** 2

        # Encoder: (B, 1, 28, 28) -> (B, 32, 14, 14) -> (B, 64, 7, 7) -> (B, 128, 4, 4) -> (B, 256, 2, 2)
        stages, c = [], in_channels
        for h in hidden_dims:
            stages.append(_block(nn.Conv2d(c, h, 3, stride=2, padding=1), h))
            c = h
        self.encoder = nn.Sequential(*stages)
        # (B, 256·2·2) -> mu, log_var: (B, latent_dim) each
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_log_var = nn.Linear(flat, latent_dim)

        # Decoder: (B, latent_dim) -> (B, 256, 2, 2) -> (B, 128, 4, 4) -> (B, 64, 7, 7) -> (B, 32, 14, 14).
        # A transposed conv (k3, s2, p1) gives 2·in − 1 + output_padding: the padding is chosen to
        # land on the encoder's size at that depth, so the output is exactly image_size.
        self.decoder_input = nn.Linear(latent_dim, flat)
        rev = hidden_dims[::-1]
        up = []
        for i in range(len(rev) - 1):
            pad = sizes[len(rev) - 1 - i] - (2 * sizes[len(rev) - i] - 1)
            up.append(_block(nn.ConvTranspose2d(rev[i], rev[i + 1], 3, stride=2, padding=1, output_padding=pad),
                             rev[i + 1]))
        self.decoder = nn.Sequential(*up)
        # (B, 32, 14, 14) -> (B, 32, 28, 28) -> (B, 1, 28, 28) logits
        pad = image_size - (2 * sizes[1] - 1)
        up_last = _block(nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=pad), rev[-1])
        if decoder == "conv":
            self.final_layer = nn.Sequential(up_last, nn.Conv2d(rev[-1], in_channels, 3, padding=1))
            self.ar_head = None
        else:  # the head turns the 28×28 features into logits, given the pixels before each one
            self.final_layer = nn.Sequential(up_last)
            self.ar_head = LocalAutoregressiveHead(rev[-1], in_channels, ar_channels, ar_kernel, ar_layers)

    @property
    def autoregressive(self) -> bool:
        """True when p(x|z) is autoregressive (decoding needs x, sampling draws pixel by pixel)."""
        return self.ar_head is not None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> (mu, log_var), each (B, latent_dim)."""
        if not self.use_latent:  # q(z|x) = p(z): mu = 0, log_var = 0
            zeros = x.new_zeros(x.shape[0], self.latent_dim)
            return zeros, zeros
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_log_var(h)

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        if not self.use_latent:
            z = torch.zeros_like(z)
        h = self.decoder_input(z).view(-1, self.hidden_dims[-1], self._bottom, self._bottom)
        return self.final_layer(self.decoder(h))

    def decode_logits(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> pre-sigmoid logits (B, C, H, W) of p(x|z).

        The autoregressive decoder needs the images ``x`` too: each pixel's logit is conditioned
        on the true pixels before it (teacher forcing). The conv decoder ignores ``x``.
        """
        h = self._features(z)
        if self.ar_head is None:
            return h
        if x is None:
            raise ValueError("the autoregressive decoder scores images given x (decode_logits(z, x)); "
                             "call decode(z) to draw new images")
        return self.ar_head(h, x)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, H, W) in [0, 1].

        Conv decoder: the pixel means. Autoregressive decoder: with ``x``, each pixel's mean given
        the true pixels before it; without, pixels are drawn one by one (``generator`` seeds the
        draws) and each pixel's mean given the drawn ones is returned.
        """
        if self.ar_head is not None and x is None:
            return self.ar_head.sample(self._features(z), generator)[0]
        return torch.sigmoid(self.decode_logits(z, x))

    @staticmethod
    def reparameterize(mu: torch.Tensor, log_var: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): a sample that gradients flow through.

        ``generator`` draws eps from a caller's seeded stream (fixed-noise evaluation).
        """
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * log_var) * eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (reconstruction in [0, 1], mu, log_var)."""
        recon, mu, log_var, _ = self.forward_with_z(x)
        return recon, mu, log_var

    def forward_with_z(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (reconstruction, mu, log_var, z): the sampled z too, for losses that need it."""
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var)
        return self.decode(z, x), mu, log_var, z

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n images from the prior: z ~ N(0, I), x = decode(z)."""
        device = device if device is not None else next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z, generator=generator)
