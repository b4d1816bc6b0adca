"""The fast path: faster forms of the same computation on the CPU, applied in one visible step.

``model = accelerate(model, device)`` swaps a model's plain layers for twins in
:mod:`vae.fast.layers` that keep the parameters and state_dict keys and compute the same
function (tested against the plain layers in float64), and :func:`retained_heap` keeps freed
memory in the process while training. The trainer does both when ``fast`` is on (the default);
``fast: false`` trains the plain ``torch.nn`` model under glibc's default heap.

What applies, where, and why (figures: BENCHMARKS.md, "Fast path", ``python -m benchmarks.fast``):

===============  ================================================  ==========================================
form             what it does                                      where it applies
===============  ================================================  ==========================================
``bias_after``   conv and transposed-conv bias added after the     every ``Conv2d`` / ``ConvTranspose2d``;
                 convolution, in place: oneDNN's fused bias        CPU float32
                 gradient costs more than a separate sum
``matmul``       convolutions whose small side is a 2×2 map as     those layers (the default model's 128→256
                 im2col / col2im + oneDNN's matrix product         conv and 256→128 transposed conv); CPU
                 (:mod:`vae.fast.gemm`): oneDNN's direct kernels   float32, channels-last weights, no
                 are slow on such tiny maps                        autocast, not under ``torch.compile``
``output_conv``  the few-channel output conv (32→1 at 28×28) as    a stride-1 'same' conv with ≤ 4 output
                 a 1×1 conv to k·k tap maps plus a shifted sum     channels and an odd kernel; CPU float32
``bn_act``       ``BatchNorm2d`` + ``LeakyReLU`` as one compiled   each such pair (the activation becomes
                 kernel (:mod:`vae.fast.bn_act`): two passes over  ``nn.Identity``); CPU float32 where a C++
                 memory each way instead of five and six           compiler builds it, no autocast
``bn_act_conv``  the decoder's last BatchNorm, LeakyReLU and       a ``Sequential(block ending in BatchNorm +
                 output conv as one kernel                         LeakyReLU, output conv)`` with a conv that
                 (:mod:`vae.fast.bn_act_conv`): the 28×28 map      fits ``output_conv``; CPU float32
                 between them never goes to memory                 channels-last, no autocast
``heap``         :func:`retained_heap`: freed activation buffers   training (``retain_memory``), evaluation
                 stay in the process instead of being unmapped     and the FID classifier's training; Linux
                 and re-faulted every step                         with glibc
===============  ================================================  ==========================================

On CUDA, MPS, float64 or bf16 models :func:`accelerate` changes nothing: the forms were never
measured there. :func:`forms` says which form each layer of a model took. Tried and deleted, as
each saved under 3% of a step: the activation in place (1.9% and 3.3% in two runs), the linear layers on oneDNN's matmul
(slower on the Intel Xeon, under 3% on AMD), the parameters in one flat tensor (0.99-1.02x), the
output conv's weight gradient as per-image matrix products (~1%).
"""

from __future__ import annotations

import torch
from torch import nn

from vae.fast import bn_act
from vae.fast.bn_act import BatchNormAct
from vae.fast.bn_act_conv import NormActConv
from vae.fast.heap import retained_heap
from vae.fast.layers import MATMUL_MAX_POSITIONS, Conv2d, ConvTranspose2d, OutputConv

__all__ = ["FORMS", "accelerate", "applies", "forms", "retained_heap"]

FORMS = ("bias_after", "matmul", "output_conv", "bn_act", "bn_act_conv")  # the layer forms; the heap is retained_heap


def applies(device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """True where the layer forms were measured faster: the CPU, float32."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def accelerate(model: nn.Module, device: torch.device | str | None = None,
               include: tuple[str, ...] = FORMS, *, enabled: bool = True) -> nn.Module:
    """Swap ``model``'s layers, in place, for their fast twins where :func:`applies`; returns it.

    Call after moving the model to its device, dtype and memory format: the matrix form is chosen
    only for layers whose weights are channels-last then. The state_dict is unchanged, so a
    checkpoint of an accelerated model loads into the plain one and back.

    Args:
        device: where the model runs (default: where its parameters are).
        include: the forms to apply (all by default; ``benchmarks/fast.py`` leaves each out in turn).
        enabled: ``False`` returns the model unchanged (a config's ``fast`` key:
            ``accelerate(model, device, enabled=cfg.run.fast)``).
    """
    unknown = set(include) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown fast forms {sorted(unknown)}; choose from {FORMS}")
    weight = next(model.parameters(), None)
    if not enabled or weight is None or not applies(device if device is not None else weight.device, weight.dtype):
        return model
    small = _small_map_layers(model) if "matmul" in include else set()
    if "bn_act_conv" in include:  # first: it matches the plain BatchNorm, LeakyReLU and output conv
        _fuse_tail(model)
    for name, module in list(model.named_modules()):
        twin = _twin(module, include, name in small)
        if twin is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, twin)
    if "bn_act" in include:
        _fuse_norm_act(model)
    return model


def _fuse_norm_act(model: nn.Module) -> None:
    """Each ``BatchNorm2d`` followed by a ``LeakyReLU`` in a ``Sequential`` -> ``BatchNormAct`` and
    ``nn.Identity`` (no state, so the state_dict keys stay); nothing where the kernel is not built."""
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        for i in range(len(seq) - 1):
            if BatchNormAct.fits(seq[i], seq[i + 1]) and bn_act.library() is not None:
                seq[i], seq[i + 1] = BatchNormAct.from_plain(seq[i], seq[i + 1]), nn.Identity()


def _fuse_tail(model: nn.Module) -> None:
    """Each ``Sequential(block ending in BatchNorm2d + LeakyReLU, output conv)`` -> ``NormActConv``
    (the same children); nothing where the kernel is not built."""
    for name, module in list(model.named_modules()):
        if name and NormActConv.fits(module) and bn_act.library() is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NormActConv.from_plain(module))


def _small_map_layers(model: nn.Module) -> set[str]:
    """Names of the convolutions whose small side is at most a 2×2 map, found by running the
    model once on a blank image (a model without ``image_size`` and ``in_channels``: none)."""
    size, channels = getattr(model, "image_size", None), getattr(model, "in_channels", None)
    if not isinstance(size, int) or not isinstance(channels, int):
        return set()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, (*i[0].shape, *o.shape)))
             for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.ConvTranspose2d)]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            model.eval()(torch.zeros(1, channels, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    small = {}
    for name, (_, _, in_h, in_w, _, _, out_h, out_w) in shapes.items():
        transposed = type(model.get_submodule(name)) is nn.ConvTranspose2d
        small[name] = (in_h * in_w if transposed else out_h * out_w) <= MATMUL_MAX_POSITIONS
    return {name for name, yes in small.items() if yes}


def _twin(module: nn.Module, include: tuple[str, ...], small: bool) -> nn.Module | None:
    """The fast twin of one plain layer, or None to keep it."""
    if "output_conv" in include and OutputConv.fits(module):
        return OutputConv.from_plain(module)
    if type(module) not in (nn.Conv2d, nn.ConvTranspose2d):
        return None
    matmul = small and module.weight.is_contiguous(memory_format=torch.channels_last)
    if "bias_after" not in include and not matmul:
        return None
    bias_after = "bias_after" in include
    if type(module) is nn.Conv2d:
        return Conv2d.from_plain(module, matmul, bias_after)
    if type(module) is nn.ConvTranspose2d:
        return ConvTranspose2d.from_plain(module, matmul, bias_after)
    return None


def forms(model: nn.Module) -> dict[str, str]:
    """Layer name -> the form each convolution, linear layer and BatchNorm computes in: 'plain',
    'bias_after', 'bias_after+matmul' (the matrix form: a 2×2 map), 'output_conv', 'bn_act'
    (a BatchNorm with the LeakyReLU after it) or 'bn_act_conv' (a BatchNorm and the output conv
    of one fused last stage)."""
    out = {}
    tails = [(name, m) for name, m in model.named_modules() if isinstance(m, NormActConv)]
    fused = {f"{name}.{part}" for name, m in tails for part in (f"0.{len(m[0]) - 2}", "1")}
    for name, module in model.named_modules():
        if name in fused:
            out[name] = "bn_act_conv"
        elif isinstance(module, BatchNormAct):
            out[name] = "bn_act"
        elif type(module) is nn.BatchNorm2d:
            out[name] = "plain"
        elif isinstance(module, OutputConv):
            out[name] = "output_conv"
        elif isinstance(module, (Conv2d, ConvTranspose2d)):
            out[name] = "+".join(f for f, on in (("bias_after", module.bias_after), ("matmul", module.matmul)) if on)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            out[name] = "plain"
    return out
