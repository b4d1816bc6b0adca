"""The autoregressive decoder head: p(x_i | z, x_<i) from decoder features and the pixels before i.

A local PixelVAE (Gulrajani et al. 2017): each pixel sees the conv decoder's features at its
position and a causal k×k neighbourhood of the pixels before it in raster order (PixelCNN's mask
'A', van den Oord et al. 2016), read by a per-pixel MLP. Training and likelihoods use teacher
forcing (one pass, the image as context); sampling draws the pixels one by one, which costs only
the small head per pixel because its receptive field on x is a few rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalConv", "LocalAutoregressiveHead"]


class CausalConv(nn.Module):
    """A 3×3 convolution with PixelCNN's mask 'B': each position sees itself and the positions before it.

    Taps: the three above (row − 1, columns − 1..+1), the one to the left and the centre. Written as
    a 2×3 kernel over the input padded one row above and one column each side, with the centre row's
    right tap masked to zero, so no work goes to the rows below.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, (2, 3))
        mask = torch.ones(1, 1, 2, 3)
        mask[..., 1, 2] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def kernel(self) -> torch.Tensor:
        """The masked 2×3 kernel (C_out, C_in, 2, 3): the weight with the centre row's right tap zeroed."""
        return self.conv.weight * self.mask

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(a, (1, 1, 1, 0)), self.kernel(), self.conv.bias)


class LocalAutoregressiveHead(nn.Module):
    """Bernoulli logits of p(x_i | z, x_<i) from decoder features and the causal neighbourhood of x.

    Per pixel i, an MLP reads the decoder's features h_i (which depend on z only) and the pixels
    of x in the k×k window around i that come before i in raster order (the k//2 rows above and
    the k//2 pixels to the left: PixelCNN's mask 'A', van den Oord et al. 2016, in every channel):

        logit_i = W3 · σ(W2 · σ(W1 · [h_i ; x_window(i)] + b1) + b2) + b3,   σ = LeakyReLU(0.2)

    With ``layers`` > 1, each extra layer adds a residual :class:`CausalConv` after the first,
    a ← a + σ(conv(a)), which widens the context by one row above and one column each side per
    layer while every logit still sees only the pixels before it.

    It is written as matrix products over all B·H·W pixels at once (the window is gathered with
    ``unfold``), which is what a masked convolution followed by 1×1 convolutions computes, without
    the masked taps' work.
    """

    def __init__(self, feature_channels: int, in_channels: int, channels: int = 32, kernel_size: int = 7,
                 layers: int = 1):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        k, c = kernel_size, kernel_size // 2
        self.in_channels, self.kernel_size = in_channels, kernel_size
        before = [r * k + col for r in range(c + 1) for col in range(k) if r < c or col < c]
        # Rows of unfold's (C·k·k) window for the full kernel, and of the (C·(c+1)·k) window sampling uses.
        self.register_buffer("taps", torch.tensor([ch * k * k + t for ch in range(in_channels) for t in before]),
                             persistent=False)
        self.register_buffer("sample_taps", torch.tensor([ch * (c + 1) * k + t for ch in range(in_channels)
                                                          for t in before]), persistent=False)
        self.inp = nn.Linear(feature_channels + len(self.taps), channels)
        self.hidden = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, in_channels)
        self.causal = nn.ModuleList(CausalConv(channels) for _ in range(layers - 1))

    def _mlp(self, f: torch.Tensor) -> torch.Tensor:
        """The per-pixel layers after the first (and any causal ones): (..., channels) -> (..., in_channels)."""
        return self.out(F.leaky_relu(self.hidden(f), 0.2))

    def _first(self, f: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.inp(f), 0.2)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, C, H, W): every pixel given the true pixels before it."""
        b, _, height, width = h.shape
        window = F.unfold(x.to(h.dtype), self.kernel_size, padding=self.kernel_size // 2)  # (B, C·k·k, H·W)
        feats = torch.cat((h.permute(0, 2, 3, 1).reshape(b, height * width, -1),
                           window.index_select(1, self.taps).transpose(1, 2)), dim=-1)
        a = self._first(feats).view(b, height, width, -1)  # (B, H, W, channels)
        for layer in self.causal:  # as (B, channels, H, W) in channels-last memory, no copies
            a = a + F.leaky_relu(layer(a.permute(0, 3, 1, 2)), 0.2).permute(0, 2, 3, 1)
        return self._mlp(a).permute(0, 3, 1, 2)

    @torch.no_grad()
    def sample(self, h: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x pixel by pixel: (each pixel's Bernoulli mean given the pixels drawn before it, the draw).

        Only that pixel's share of the head runs per step, batched over images: a 28×28 image is 784
        small steps. Each causal layer's input is kept (padded one row above and a column either
        side, as its convolution pads it): every tap of a mask-'B' kernel at (i, j) lies at or before
        (i, j) in raster order, so it was stored at an earlier step or this one.
        """
        b, _, height, width = h.shape
        k, c = self.kernel_size, self.kernel_size // 2
        feats = h.permute(0, 2, 3, 1)  # (B, H, W, F)
        x = h.new_zeros(b, self.in_channels, height + c, width + 2 * c)  # zero padding above, left, right
        probs = h.new_empty(b, self.in_channels, height, width)
        inputs = [h.new_zeros(b, height + 1, width + 2, self.inp.out_features) for _ in self.causal]
        # (2·3·C_in, C_out) matrices of the masked kernels, rows in the (row, column, channel) order of a window
        kernels = [layer.kernel().permute(2, 3, 1, 0).flatten(0, 2) for layer in self.causal]
        for i in range(height):
            for j in range(width):
                window = x[:, :, i:i + c + 1, j:j + k].flatten(1).index_select(1, self.sample_taps)
                a = self._first(torch.cat((feats[:, i, j], window), dim=1))
                for store, kernel, layer in zip(inputs, kernels, self.causal):
                    store[:, i + 1, j + 1] = a
                    a = a + F.leaky_relu(store[:, i:i + 2, j:j + 3].flatten(1) @ kernel + layer.conv.bias, 0.2)
                p = torch.sigmoid(self._mlp(a))
                probs[:, :, i, j] = p
                x[:, :, i + c, j + c] = torch.bernoulli(p, generator=generator)
        return probs, x[:, :, c:, c:width + c]
