"""The convolutional VAE: a stride-2 CNN encoder to (mu, log_var), a transposed-CNN decoder.

A pure ``nn.Module``: no logging, files, device choice or config parsing. The decoder mirrors
the encoder's spatial sizes exactly, so any number of stages returns ``image_size`` pixels.

Two decoders:

- ``'conv'`` (default, the seed's): pixels independent given z, p(x|z) = Π_i p(x_i|z).
- ``'autoregressive'``: p(x|z) = Π_i p(x_i | z, x_<i) in raster order, each pixel seeing the
  conv decoder's features and a causal k×k neighbourhood of the pixels before it (PixelCNN's
  mask 'A', van den Oord et al. 2016, read by a per-pixel MLP; a local PixelVAE, Gulrajani et
  al. 2017). Training and likelihoods use teacher forcing (one pass, the image as
  context: ``decode_logits(z, x)``); sampling (``decode(z)``) draws the pixels one by one, which
  costs only the small local head per pixel because the receptive field on x is one layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vae import gemm


def _conv_out(size: int) -> int:
    """Spatial size after Conv2d(kernel 3, stride 2, padding 1)."""
    return (size - 1) // 2 + 1


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    # In place: BatchNorm's backward reads its input, not its output, so the activation may overwrite it.
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2, inplace=True))


# The layer classes below compute what nn.Linear / nn.Conv2d / nn.ConvTranspose2d compute, with the
# same parameters and state_dict keys, in forms that run faster on the CPU (measured in
# BENCHMARKS.md, "Training throughput"). Checkpoints are interchangeable with the plain layers.

# A convolution whose small side (a conv's output, a transposed conv's input) has at most this many
# positions per image runs as a matrix product (vae.gemm) in a channels-last float32 model on the CPU:
# 2×2 maps ran 1.5-1.7x faster that way, 4×4 maps slower (BENCHMARKS.md, benchmarks/gemm.py).
GEMM_MAX_POSITIONS = 4


def _gemm_form(layer: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor) -> bool:
    """True when ``layer`` should run on ``x`` as a matrix product (see ``GEMM_MAX_POSITIONS``)."""
    if isinstance(layer.padding, str) or x.dim() != 4 or layer.groups != 1 or layer.dilation != (1, 1) \
            or layer.padding_mode != "zeros" or not layer.weight.is_contiguous(memory_format=torch.channels_last) \
            or any(len(set(v)) != 1 for v in (layer.kernel_size, layer.stride, layer.padding, layer.output_padding)):
        return False
    h, w = x.shape[-2:]
    if not isinstance(layer, nn.ConvTranspose2d):  # the output map is the small side
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return h * w <= GEMM_MAX_POSITIONS and gemm.usable(x, layer.weight, layer.bias)


class Linear(nn.Linear):
    """``nn.Linear`` on oneDNN's matmul where :func:`vae.gemm.usable` (MKL's float32 product runs at
    half its speed on AMD CPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the bias added after the convolution: y = conv(x, W) + b; a matrix
    product (im2col) when the output map is small (``GEMM_MAX_POSITIONS``).

    oneDNN folds the bias gradient into its weight-gradient kernel, which then costs more than a
    separate sum over the output gradient (most for the 32-channel 28×28 layer).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gemm_form(self, x):
            return gemm.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])
        y = self._conv_forward(x, self.weight, None)  # a new tensor that backward does not read:
        return y if self.bias is None else y.add_(self.bias.view(-1, 1, 1))  # add in place


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with the bias added after the convolution (see :class:`Conv2d`); a
    matrix product (col2im) when the input map is small (``GEMM_MAX_POSITIONS``)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None and _gemm_form(self, x):
            return gemm.conv_transpose2d(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                         self.output_padding[0])
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, pad, self.groups, self.dilation)
        return y if self.bias is None else y.add_(self.bias.view(-1, 1, 1))


class _ShiftSum(torch.autograd.Function):
    """(B, C, k·k, H, W) tap maps -> (B, C, H, W): y[h, w] = Σ_t P_t[h + dy_t − k//2, w + dx_t − k//2]
    (zero outside), t = dy_t·k + dx_t. Backward: each tap's gradient is the output gradient shifted back."""

    @staticmethod
    def forward(ctx, taps: torch.Tensor, k: int) -> torch.Tensor:
        h, w, p = taps.shape[-2], taps.shape[-1], k // 2
        padded = F.pad(taps, (p, p, p, p))
        y = padded[:, :, 0, :h, :w].clone()
        for t in range(1, k * k):
            dy, dx = divmod(t, k)
            y += padded[:, :, t, dy:dy + h, dx:dx + w]
        ctx.k, ctx.channels_last = k, taps.stride(2) == 1  # taps from a channels-last convolution
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        h, w, p = grad.shape[-2], grad.shape[-1], k // 2
        padded = F.pad(grad, (p, p, p, p))
        shifts = [padded[:, :, k - 1 - dy:k - 1 - dy + h, k - 1 - dx:k - 1 - dx + w] for dy in range(k) for dx in range(k)]
        if ctx.channels_last:  # the gradient in the taps' own layout, (B, H, W, C, k·k) in memory: no reorder
            return torch.stack([s.permute(0, 2, 3, 1) for s in shifts], dim=-1).permute(0, 3, 4, 1, 2), None
        return torch.stack(shifts, dim=2), None


class _TapConv(torch.autograd.Function):
    """``F.conv2d(x, w)`` for a 1×1 ``w`` with few output channels, whose weight gradient is a sum of
    per-image matrix products: oneDNN's 1×1 backward-weights kernel took 2.1 ms for the default
    model's 32→9 taps at 28×28 once the activations had left the cache, ``bmm`` 0.8 ms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            b, c = x.shape[:2]
            if x.is_contiguous(memory_format=torch.channels_last):  # (B, H·W, C) views, no copies
                gw = torch.bmm(grad.permute(0, 2, 3, 1).reshape(b, -1, grad.shape[1]).transpose(1, 2),
                               x.permute(0, 2, 3, 1).reshape(b, -1, c))
            else:
                gw = torch.bmm(grad.reshape(b, grad.shape[1], -1), x.reshape(b, c, -1).transpose(1, 2))
            gw = gw.sum(0).view_as(w)
        return gx, gw


class OutputConv(nn.Conv2d):
    """``nn.Conv2d(in, out, k, padding=k//2)`` for a few output channels (the image), computed as a
    1×1 convolution to out·k·k tap maps, then a shifted sum of the maps.

    A convolution with one output channel fits oneDNN's channel blocking badly: at 32→1, 28×28 it
    took longer than the 32→32 layer before it. The 1×1 form does the same multiply-adds in
    kernels that are blocked on the k·k taps instead (its weight gradient: :class:`_TapConv`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, k = self.out_channels, self.kernel_size[0]
        # (out, in, k, k) -> (out·k·k, in, 1, 1): row o·k·k + t holds tap t of output channel o
        w = self.weight.permute(0, 2, 3, 1).reshape(out * k * k, self.in_channels, 1, 1)
        if torch.is_autocast_enabled(x.device.type):  # bf16 products, the shifted sums in float32
            taps = F.conv2d(x, w).float()
        else:
            taps = _TapConv.apply(x, w)  # (B, out·k·k, H, W)
        y = _ShiftSum.apply(taps.unflatten(1, (out, k * k)), k)
        return y + self.bias.view(-1, 1, 1)


class LocalAutoregressiveHead(nn.Module):
    """Bernoulli logits of p(x_i | z, x_<i) from decoder features and the causal neighbourhood of x.

    Per pixel i, an MLP reads the decoder's features h_i (which depend on z only) and the pixels
    of x in the k×k window around i that come before i in raster order (the k//2 rows above and
    the k//2 pixels to the left: PixelCNN's mask 'A', van den Oord et al. 2016, in every channel):

        logit_i = W3 · σ(W2 · σ(W1 · [h_i ; x_window(i)] + b1) + b2) + b3,   σ = LeakyReLU(0.2)

    It is written as matrix products over all B·H·W pixels at once (the window is gathered with
    ``unfold``), which is what a masked convolution followed by 1×1 convolutions computes, without
    the masked taps' work.
    """

    def __init__(self, feature_channels: int, in_channels: int, channels: int = 32, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
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

    def _mlp(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(F.leaky_relu(self.hidden(F.leaky_relu(self.inp(f), 0.2)), 0.2))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, C, H, W): every pixel given the true pixels before it."""
        b, _, height, width = h.shape
        window = F.unfold(x.to(h.dtype), self.kernel_size, padding=self.kernel_size // 2)  # (B, C·k·k, H·W)
        feats = torch.cat((h.permute(0, 2, 3, 1).reshape(b, height * width, -1),
                           window.index_select(1, self.taps).transpose(1, 2)), dim=-1)
        return self._mlp(feats).view(b, height, width, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def sample(self, h: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x pixel by pixel: (each pixel's Bernoulli mean given the pixels drawn before it, the draw).

        Only the MLP runs per pixel, batched over images: a 28×28 image is 784 small steps.
        """
        b, _, height, width = h.shape
        k, c = self.kernel_size, self.kernel_size // 2
        feats = h.permute(0, 2, 3, 1)  # (B, H, W, F)
        x = h.new_zeros(b, self.in_channels, height + c, width + 2 * c)  # zero padding above, left, right
        probs = h.new_empty(b, self.in_channels, height, width)
        for i in range(height):
            for j in range(width):
                window = x[:, :, i:i + c + 1, j:j + k].flatten(1).index_select(1, self.sample_taps)
                p = torch.sigmoid(self._mlp(torch.cat((feats[:, i, j], window), dim=1)))
                probs[:, :, i, j] = p
                x[:, :, i + c, j + c] = torch.bernoulli(p, generator=generator)
        return probs, x[:, :, c:, c:width + c]


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
        ar_channels, ar_kernel: width and kernel size of the autoregressive head.
    """

    def __init__(self, in_channels: int = 1, hidden_dims: Sequence[int] = (32, 64, 128, 256),
                 latent_dim: int = 128, image_size: int = 28, beta: float = 1.0, decoder: str = "conv",
                 ar_channels: int = 32, ar_kernel: int = 7):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one stage")
        self.in_channels, self.latent_dim, self.image_size, self.beta = in_channels, latent_dim, image_size, beta
        self.hidden_dims = hidden_dims
        if decoder not in ("conv", "autoregressive"):
            raise ValueError(f"decoder must be 'conv' or 'autoregressive', got {decoder!r}")

        # Spatial size after each stage, e.g. 28 -> [14, 7, 4, 2] for four stages.
        sizes = [image_size]
        for _ in hidden_dims:
            sizes.append(_conv_out(sizes[-1]))
        self._bottom = sizes[-1]
        flat = hidden_dims[-1] * self._bottom ** 2

        # (B, C, 28, 28) -> (B, 32, 14, 14) -> (B, 64, 7, 7) -> (B, 128, 4, 4) -> (B, 256, 2, 2)
        stages, c = [], in_channels
        for h in hidden_dims:
            stages.append(_block(Conv2d(c, h, 3, stride=2, padding=1), h))
            c = h
        self.encoder = nn.Sequential(*stages)
        self.fc_mu = Linear(flat, latent_dim)
        self.fc_log_var = Linear(flat, latent_dim)

        # Transposed conv (k3, s2, p1) gives 2*in - 1 + output_padding: pick the padding that
        # lands on the encoder's size at that depth, so the output is exactly image_size.
        self.decoder_input = Linear(latent_dim, flat)
        rev = hidden_dims[::-1]
        up = []
        for i in range(len(rev) - 1):
            target = sizes[len(rev) - 1 - i]
            pad = target - (2 * sizes[len(rev) - i] - 1)
            up.append(_block(ConvTranspose2d(rev[i], rev[i + 1], 3, stride=2, padding=1, output_padding=pad),
                             rev[i + 1]))
        self.decoder = nn.Sequential(*up)
        pad = image_size - (2 * sizes[1] - 1)
        # (B, 32, 14, 14) -> (B, 32, 28, 28) -> (B, C, 28, 28) logits
        up_last = _block(ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=pad), rev[-1])
        if decoder == "conv":
            self.final_layer = nn.Sequential(up_last, OutputConv(rev[-1], in_channels, 3))
            self.ar_head = None
        else:  # the head turns the 28x28 features into logits, given the pixels before each one
            self.final_layer = nn.Sequential(up_last)
            self.ar_head = LocalAutoregressiveHead(rev[-1], in_channels, ar_channels, ar_kernel)

    @property
    def autoregressive(self) -> bool:
        """True when p(x|z) is autoregressive (decoding needs x, sampling draws pixel by pixel)."""
        return self.ar_head is not None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> (mu, log_var), each (B, latent_dim)."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_log_var(h)

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_input(z).view(-1, self.hidden_dims[-1], self._bottom, self._bottom)
        return self.final_layer(self.decoder(h))

    def decode_logits(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> pre-sigmoid logits (B, C, H, W) of p(x|z).

        The autoregressive decoder needs the images ``x`` (B, C, H, W) too: the logit of each
        pixel is conditioned on the true pixels before it (teacher forcing). The conv decoder
        ignores ``x``.
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
        return self.decode(z, x), mu, log_var, z

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n images from the prior: z ~ N(0, I), x = decode(z)."""
        device = device if device is not None else next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z, generator=generator)
