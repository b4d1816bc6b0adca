"""Convolutions on 2×2 maps as oneDNN matrix products (CPU, float32).

oneDNN's direct convolution kernels run the seed's 128→256 conv (4×4→2×2) and its mirror, the
256→128 transposed conv (2×2→4×4), at a fraction of the machine's matrix-product speed: the maps
are too small for their blocking. The same multiply-adds as im2col / col2im + one matrix product
take those layers' forward + backward 1.5x faster (``python -m benchmarks.gemm``, on an AMD Zen 5
and an Intel Xeon); larger maps stay with oneDNN's convolutions, which are faster there. The
product is ``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own compiler emits for CPU
linear layers (on AMD CPUs 1.7-2.3x faster than MKL's sgemm, which takes its AVX2 path there; on
the Intel Xeon measured, equal); this module gives it backward passes.

Every function here computes exactly what its ``torch.nn.functional`` namesake computes (tests
compare outputs and gradients with float64 references), and :func:`usable` says when the fast form
applies: CPU float32 tensors, oneDNN's op present and correct (checked once), no autocast (bf16
keeps PyTorch's own kernels) and no ``torch.compile`` tracing (the compiler picks its own).
Backward passes are once differentiable.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["available", "usable", "conv2d", "conv_transpose2d"]


@functools.cache
def available() -> bool:
    """True when oneDNN's matmul op exists in this PyTorch build and agrees with ``torch.matmul``."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return False
    try:
        a, w = torch.arange(12.0).view(3, 4), torch.arange(8.0).view(2, 4)
        return torch.equal(op(a, w, None, "none", [], ""), a @ w.T)
    except (RuntimeError, NotImplementedError):
        return False


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when the matmul forms apply to these tensors (see the module docstring); None entries
    (an absent bias) are skipped."""
    return (all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and available())


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ (+ bias) on oneDNN's matmul; a and b may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


# -- convolutions -----------------------------------------------------------------------------------
# Images are handled as (B, H, W, C), the memory order of a channels-last tensor, so a permute to it
# is free. im2col gathers each output position's k×k window as one row of (k·k·C) values ordered
# (dy, dx, c): that is a channels-last weight (out, k, k, in) read as a matrix, again free.

def _im2col(x: torch.Tensor, k: int, stride: int, pad: int, out_h: int, out_w: int) -> torch.Tensor:
    """x (B, H, W, C) -> (B·out_h·out_w, k·k·C): row (b, i, j) holds x[b, stride·i + dy − pad,
    stride·j + dx − pad, :] for dy, dx < k (zero outside the image)."""
    b, h, w, c = x.shape
    span_h, span_w = stride * (out_h - 1) + k, stride * (out_w - 1) + k
    padded = F.pad(x, (0, 0, pad, max(span_w - w - pad, 0), pad, max(span_h - h - pad, 0)))
    sb, sh, sw, sc = padded.stride()
    windows = padded.as_strided((b, out_h, out_w, k, k, c), (sb, stride * sh, stride * sw, sh, sw, sc))
    return windows.reshape(b * out_h * out_w, k * k * c)


def _col2im(cols: torch.Tensor, batch: int, k: int, stride: int, pad: int, in_h: int, in_w: int,
            h: int, w: int) -> torch.Tensor:
    """The adjoint of :func:`_im2col`: (B·in_h·in_w, k·k·C) rows summed back into (B, h, w, C)."""
    c = cols.shape[1] // (k * k)
    span_h, span_w = stride * (in_h - 1) + k, stride * (in_w - 1) + k
    out = cols.new_zeros(batch, max(span_h, h + pad), max(span_w, w + pad), c)
    taps = cols.view(batch, in_h, in_w, k, k, c)
    for dy in range(k):
        for dx in range(k):
            out[:, dy:dy + span_h - k + 1:stride, dx:dx + span_w - k + 1:stride] += taps[:, :, :, dy, dx]
    return out[:, pad:pad + h, pad:pad + w]


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad):
        b, c, h, w = x.shape
        out_c, k = weight.shape[0], weight.shape[-1]
        out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        cols = _im2col(x.permute(0, 2, 3, 1), k, stride, pad, out_h, out_w)
        w_mat = weight.permute(0, 2, 3, 1).reshape(out_c, k * k * c)
        ctx.save_for_backward(cols, w_mat)
        ctx.geometry = (b, c, h, w, k, stride, pad, out_h, out_w, bias is not None)
        return _mm(cols, w_mat, bias).view(b, out_h, out_w, out_c).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cols, w_mat = ctx.saved_tensors
        b, c, h, w, k, stride, pad, out_h, out_w, has_bias = ctx.geometry
        g = grad.permute(0, 2, 3, 1).reshape(b * out_h * out_w, -1)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            gx = _col2im(_mm(g, w_mat.T), b, k, stride, pad, out_h, out_w, h, w).permute(0, 3, 1, 2)
        if need_w:
            gw = _mm(g.T, cols.T).view(-1, k, k, c).permute(0, 3, 1, 2)
        if need_b and has_bias:
            gb = g.sum(0)
        return gx, gw, gb, None, None


class _ConvTranspose2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad, out_pad):
        b, c, h, w = x.shape
        out_c, k = weight.shape[1], weight.shape[-1]
        out_h, out_w = (h - 1) * stride - 2 * pad + k + out_pad, (w - 1) * stride - 2 * pad + k + out_pad
        x_mat = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        w_mat = weight.permute(0, 2, 3, 1).reshape(c, k * k * out_c)  # (in, k·k·out)
        y = _col2im(_mm(x_mat, w_mat.T), b, k, stride, pad, h, w, out_h, out_w)
        y = y + bias if bias is not None else y.contiguous()
        ctx.save_for_backward(x_mat, w_mat)
        ctx.geometry = (b, c, h, w, k, stride, pad, bias is not None)
        return y.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_mat, w_mat = ctx.saved_tensors
        b, c, h, w, k, stride, pad, has_bias = ctx.geometry
        g = grad.permute(0, 2, 3, 1)
        cols = _im2col(g, k, stride, pad, h, w)  # (B·h·w, k·k·out): the transposed conv's adjoint is a conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            gx = _mm(cols, w_mat).view(b, h, w, c).permute(0, 3, 1, 2)
        if need_w:
            gw = _mm(x_mat.T, cols.T).view(c, k, k, -1).permute(0, 3, 1, 2)
        if need_b and has_bias:
            gb = g.sum((0, 1, 2))
        return gx, gw, gb, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (square kernel, one group) as im2col + matmul;
    the result is channels-last. Call only where :func:`usable`."""
    return _Conv2d.apply(x, weight, bias, stride, padding)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
                     output_padding: int) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)`` (square kernel, one
    group) as matmul + col2im; the result is channels-last. Call only where :func:`usable`."""
    return _ConvTranspose2d.apply(x, weight, bias, stride, padding, output_padding)
