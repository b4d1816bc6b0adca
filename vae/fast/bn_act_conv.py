"""The decoder's last stage after its transposed conv: BatchNorm, LeakyReLU and the output conv as
one compiled function, so the 28×28 activation between them is never written to memory.

In the default model the 32-channel 28×28 map is the largest tensor of a step (12.8 MB at batch
128) and its three layers only move it through memory: ``bn_act`` writes it, the output conv reads
it back, and each backward does the same again. :file:`bn_act_conv.cpp` recomputes the activation
from the BatchNorm's input one image at a time in a buffer that stays in cache, in the forward and
in both passes of the backward. :class:`NormActConv` is the ``nn.Sequential(block, conv)`` it
replaces (the same children, so the same state_dict keys); :func:`vae.fast.accelerate` applies it
where ``block`` ends in ``BatchNorm2d`` + ``LeakyReLU`` and ``conv`` fits
:class:`vae.fast.layers.OutputConv`. Anything else (contiguous memory, autocast,
``torch.compile``, other devices and dtypes, a gradient through evaluation mode) runs the layers
themselves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vae.fast import bn_act
from vae.fast.bn_act import BatchNormAct
from vae.fast.layers import OutputConv

__all__ = ["NormActConv"]

CL = torch.channels_last


def _prepare(x: torch.Tensor, conv_weight: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """The kernels' shape arguments (N, H, W, C, K, k), the conv weight as (K, k, k, C) taps and the
    output (N, K, H, W) in channels-last memory."""
    n, c, h, w = x.shape
    k_out, k = conv_weight.shape[0], conv_weight.shape[-1]
    taps = conv_weight.permute(0, 2, 3, 1).contiguous()  # a channels-last weight: already this layout
    return (n, h, w, c, k_out, k), taps, torch.empty((n, k_out, h, w), dtype=x.dtype, memory_format=CL)


class _Function(torch.autograd.Function):
    """conv(leaky_relu(batch_norm(x, training statistics), slope)); running statistics updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, conv_weight, conv_bias, factor: float, eps: float,
                slope: float):
        dims, taps, out = _prepare(x, conv_weight)
        c = x.shape[1]
        mean, invstd = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
        a, b = torch.empty_like(weight), torch.empty_like(weight)
        bn_act.kernel("conv_forward", x.dtype)(
            x.data_ptr(), out.data_ptr(), *dims, torch.get_num_threads(), weight.data_ptr(), bias.data_ptr(), eps,
            slope, bn_act.pointer(running_mean), bn_act.pointer(running_var), factor, mean.data_ptr(), invstd.data_ptr(),
            a.data_ptr(), b.data_ptr(), taps.data_ptr(), conv_bias.data_ptr())
        ctx.save_for_backward(x, taps)
        ctx.stats, ctx.dims, ctx.slope = (a, b, mean, invstd), dims, slope
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, taps = ctx.saved_tensors
        a, b, mean, invstd = ctx.stats
        grad = grad.contiguous(memory_format=CL)
        dx, dweight, dbias = torch.empty_like(x), torch.empty_like(a), torch.empty_like(a)
        dtaps, dconv_bias = torch.empty_like(taps), taps.new_empty(taps.shape[0])
        bn_act.kernel("conv_backward", x.dtype)(
            grad.data_ptr(), x.data_ptr(), dx.data_ptr(), *ctx.dims, torch.get_num_threads(), a.data_ptr(),
            b.data_ptr(), ctx.slope, mean.data_ptr(), invstd.data_ptr(), taps.data_ptr(), dweight.data_ptr(),
            dbias.data_ptr(), dtaps.data_ptr(), dconv_bias.data_ptr())
        # (K, k, k, C) in memory is the channels-last (K, C, k, k) weight
        return dx, dweight, dbias, None, None, dtaps.permute(0, 3, 1, 2), dconv_bias, None, None, None


class NormActConv(nn.Sequential):
    """``nn.Sequential(block, conv)`` whose block ends in ``BatchNorm2d`` + ``LeakyReLU`` and whose
    conv is a few-channel output conv (:meth:`OutputConv.fits`) with channels-last weights: the
    layers before the BatchNorm run as they are, the last three as one kernel on CPU
    float32/float64 channels-last input."""

    slope: float = 0.01  # the LeakyReLU's

    @classmethod
    def fits(cls, seq: nn.Module) -> bool:
        if type(seq) is not nn.Sequential or len(seq) != 2 or type(seq[0]) is not nn.Sequential or len(seq[0]) < 2:
            return False
        # a channels-last model: where the input is (a contiguous model's runs the children's forms)
        return (BatchNormAct.fits(seq[0][-2], seq[0][-1]) and OutputConv.fits(seq[1])
                and seq[1].weight.is_contiguous(memory_format=CL))

    @classmethod
    def from_plain(cls, seq: nn.Sequential) -> "NormActConv":
        twin = cls(*seq)
        twin.slope = seq[0][-1].negative_slope
        return twin.train(seq.training)

    def _fused(self, x: torch.Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> bool:
        return (bn_act.kernel_applies(x, norm.weight) and conv.weight.dtype == x.dtype
                and x.is_contiguous(memory_format=CL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, conv = self[0], self[1]
        norm, act = block[-2], block[-1]  # act: the LeakyReLU, or nn.Identity once bn_act took the pair
        for layer in list(block)[:-2]:
            x = layer(x)
        batch_stats = norm.training or norm.running_mean is None
        if not self._fused(x, norm, conv) or (not batch_stats and torch.is_grad_enabled() and x.requires_grad):
            return conv(act(norm(x)))
        if not batch_stats:  # running statistics, no gradient
            dims, taps, out = _prepare(x, conv.weight)
            bn_act.kernel("conv_apply", x.dtype)(
                x.data_ptr(), out.data_ptr(), *dims, torch.get_num_threads(),
                norm.running_mean.data_ptr(), norm.running_var.data_ptr(), norm.weight.data_ptr(),
                norm.bias.data_ptr(), norm.eps, self.slope, taps.data_ptr(), conv.bias.data_ptr())
            return out
        factor, update = bn_act.momentum_factor(norm)
        return _Function.apply(x, norm.weight, norm.bias, norm.running_mean if update else None,
                               norm.running_var if update else None, conv.weight, conv.bias, factor, norm.eps,
                               self.slope)
