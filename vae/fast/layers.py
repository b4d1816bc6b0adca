"""Faster CPU forms of ``nn.Conv2d`` / ``nn.ConvTranspose2d``: the same parameters and state_dict
keys, the same function (tests compare them with the plain layers in float64).

:func:`vae.fast.accelerate` swaps these in for the plain layers of a model; nothing else builds
them. Each class is a subclass of its plain layer, built around the plain layer's own Parameter
objects (:meth:`from_plain`), so an optimizer or checkpoint sees no difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vae.fast import gemm

__all__ = ["Conv2d", "ConvTranspose2d", "OutputConv", "MATMUL_MAX_POSITIONS"]

# A convolution whose small side (a conv's output, a transposed conv's input) has at most this many
# positions per image runs as a matrix product (vae.fast.gemm): 2×2 maps ran 1.5x faster that way
# on both machines measured, every larger map slower (BENCHMARKS.md, "Fast path").
MATMUL_MAX_POSITIONS = 4


def _share(twin: nn.Module, plain: nn.Module) -> nn.Module:
    """Give ``twin`` (built on the meta device) ``plain``'s own parameters and mode."""
    twin.weight, twin.bias = plain.weight, plain.bias
    return twin.train(plain.training)


class _FastConv:
    """What the two convolution twins share: the matrix-form switch and the small-map test."""

    matmul: bool = False  # the matrix form may be used on small maps (CPU, float32, channels-last weights)
    bias_after: bool = True  # elsewhere, add the bias after the convolution (False: the plain layer's forward)

    def _small(self, x: torch.Tensor) -> bool:
        h, w = x.shape[-2:]
        if not isinstance(self, nn.ConvTranspose2d):  # the output map is the small side
            k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return self.matmul and h * w <= MATMUL_MAX_POSITIONS and gemm.usable(x, self.weight, self.bias)

    @staticmethod
    def square_and_plain(layer: nn.Module) -> bool:
        """True when the matrix form can express ``layer`` (square kernel, stride, padding; one group)."""
        return (not isinstance(layer.padding, str) and layer.groups == 1 and layer.dilation == (1, 1)
                and layer.padding_mode == "zeros"
                and all(len(set(v)) == 1 for v in (layer.kernel_size, layer.stride, layer.padding,
                                                    layer.output_padding)))


class Conv2d(_FastConv, nn.Conv2d):
    """``nn.Conv2d`` with the bias added after the convolution, in place: y = conv(x, W) + b; a
    matrix product (im2col) when the output map is small (``MATMUL_MAX_POSITIONS``).

    oneDNN folds the bias gradient into its weight-gradient kernel, which then costs more than a
    separate sum over the output gradient (most for the 32-channel 28×28 layer).
    """

    @classmethod
    def from_plain(cls, conv: nn.Conv2d, matmul: bool, bias_after: bool = True) -> "Conv2d":
        with torch.device("meta"):
            twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        twin.matmul, twin.bias_after = matmul and cls.square_and_plain(conv), bias_after
        return _share(twin, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._small(x):
            return gemm.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])
        if not self.bias_after:
            return super().forward(x)
        y = self._conv_forward(x, self.weight, None)  # a new tensor that backward does not read:
        return y if self.bias is None else y.add_(self.bias.view(-1, 1, 1))  # add in place


class ConvTranspose2d(_FastConv, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with the bias added after the convolution (see :class:`Conv2d`); a
    matrix product (col2im) when the input map is small (``MATMUL_MAX_POSITIONS``)."""

    @classmethod
    def from_plain(cls, conv: nn.ConvTranspose2d, matmul: bool, bias_after: bool = True) -> "ConvTranspose2d":
        with torch.device("meta"):
            twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode)
        twin.matmul, twin.bias_after = matmul and cls.square_and_plain(conv), bias_after
        return _share(twin, conv)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None and self._small(x):
            return gemm.conv_transpose2d(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                         self.output_padding[0])
        if not self.bias_after:
            return super().forward(x, output_size)
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
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        h, w, p = grad.shape[-2], grad.shape[-1], k // 2
        padded = F.pad(grad, (p, p, p, p))
        shifts = [padded[:, :, k - 1 - dy:k - 1 - dy + h, k - 1 - dx:k - 1 - dx + w] for dy in range(k) for dx in range(k)]
        if ctx.channels_last:  # the gradient in the taps' own layout, (B, H, W, C, k·k) in memory: no reorder
            return torch.stack([s.permute(0, 2, 3, 1) for s in shifts], dim=-1).permute(0, 3, 4, 1, 2), None
        return torch.stack(shifts, dim=2), None


class OutputConv(nn.Conv2d):
    """``nn.Conv2d(in, out, k, padding=k//2)`` for a few output channels (the image), computed as a
    1×1 convolution to out·k·k tap maps, then a shifted sum of the maps.

    A convolution with one output channel fits oneDNN's channel blocking badly: at 32→1, 28×28 it
    took longer than the 32→32 layer before it. The 1×1 form does the same multiply-adds in
    kernels that are blocked on the k·k taps instead.
    """

    @classmethod
    def fits(cls, conv: nn.Module) -> bool:
        """True for a plain stride-1 ``nn.Conv2d`` with an odd kernel, 'same' padding, ≤ 4 outputs."""
        if type(conv) is not nn.Conv2d:
            return False
        k = conv.kernel_size[0]
        return ( conv.out_channels <= 4 and k % 2 == 1 and conv.kernel_size == (k, k)
                and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2) and conv.groups == 1
                and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and conv.bias is not None)

    @classmethod
    def from_plain(cls, conv: nn.Conv2d) -> "OutputConv":
        with torch.device("meta"):
            twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        return _share(twin, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, k = self.out_channels, self.kernel_size[0]
        # (out, in, k, k) -> (out·k·k, in, 1, 1): row o·k·k + t holds tap t of output channel o
        w = self.weight.permute(0, 2, 3, 1).reshape(out * k * k, self.in_channels, 1, 1)
        taps = F.conv2d(x, w)  # (B, out·k·k, H, W)
        if torch.is_autocast_enabled(x.device.type):  # bf16 products, the shifted sums in float32
            taps = taps.float()
        y = _ShiftSum.apply(taps.unflatten(1, (out, k * k)), k)
        return y + self.bias.view(-1, 1, 1)
