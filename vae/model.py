"""The convolutional VAE: a stride-2 CNN encoder to (mu, log_var), a transposed-CNN decoder.

A pure ``nn.Module``: no logging, files, device choice or config parsing. The decoder mirrors
the encoder's spatial sizes exactly, so any number of stages returns ``image_size`` pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _conv_out(size: int) -> int:
    """Spatial size after Conv2d(kernel 3, stride 2, padding 1)."""
    return (size - 1) // 2 + 1


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))


class VAE(nn.Module):
    """Convolutional variational autoencoder with a diagonal-Gaussian posterior.

    Args:
        in_channels: image channels.
        hidden_dims: channels of each stride-2 encoder stage; the decoder runs them in reverse.
        latent_dim: dimension of z.
        image_size: height and width of input and output images.
        beta: KL weight, kept for callers that build the plain loss from the model.
    """

    def __init__(self, in_channels: int = 1, hidden_dims: Sequence[int] = (32, 64, 128, 256),
                 latent_dim: int = 128, image_size: int = 28, beta: float = 1.0):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one stage")
        self.in_channels, self.latent_dim, self.image_size, self.beta = in_channels, latent_dim, image_size, beta
        self.hidden_dims = hidden_dims

        # Spatial size after each stage, e.g. 28 -> [14, 7, 4, 2] for four stages.
        sizes = [image_size]
        for _ in hidden_dims:
            sizes.append(_conv_out(sizes[-1]))
        self._bottom = sizes[-1]
        flat = hidden_dims[-1] * self._bottom ** 2

        # (B, C, 28, 28) -> (B, 32, 14, 14) -> (B, 64, 7, 7) -> (B, 128, 4, 4) -> (B, 256, 2, 2)
        stages, c = [], in_channels
        for h in hidden_dims:
            stages.append(_block(nn.Conv2d(c, h, 3, stride=2, padding=1), h))
            c = h
        self.encoder = nn.Sequential(*stages)
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_log_var = nn.Linear(flat, latent_dim)

        # Transposed conv (k3, s2, p1) gives 2*in - 1 + output_padding: pick the padding that
        # lands on the encoder's size at that depth, so the output is exactly image_size.
        self.decoder_input = nn.Linear(latent_dim, flat)
        rev = hidden_dims[::-1]
        up = []
        for i in range(len(rev) - 1):
            target = sizes[len(rev) - 1 - i]
            pad = target - (2 * sizes[len(rev) - i] - 1)
            up.append(_block(nn.ConvTranspose2d(rev[i], rev[i + 1], 3, stride=2, padding=1, output_padding=pad),
                             rev[i + 1]))
        self.decoder = nn.Sequential(*up)
        pad = image_size - (2 * sizes[1] - 1)
        # (B, 32, 14, 14) -> (B, 32, 28, 28) -> (B, C, 28, 28) logits
        self.final_layer = nn.Sequential(
            _block(nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=pad), rev[-1]),
            nn.Conv2d(rev[-1], in_channels, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> (mu, log_var), each (B, latent_dim)."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_log_var(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> pre-sigmoid logits (B, C, H, W)."""
        h = self.decoder_input(z).view(-1, self.hidden_dims[-1], self._bottom, self._bottom)
        return self.final_layer(self.decoder(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    @staticmethod
    def reparameterize(mu: torch.Tensor, log_var: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): a sample that gradients flow through.

        ``generator`` draws eps from a caller's seeded stream (fixed-noise evaluation) instead of
        the global one.
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
        return self.decode(z), mu, log_var, z

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n images from the prior: z ~ N(0, I), x = decode(z)."""
        device = device if device is not None else next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z)
