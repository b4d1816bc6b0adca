"""BatchNorm followed by LeakyReLU as one fused CPU kernel: the same function in fewer passes.

A training step spends a fifth of its time in the 28×28 stage's ``BatchNorm2d`` and ``LeakyReLU``,
forward and backward, all of it moving 12.8 MB tensors through memory. PyTorch runs them as
separate ops (statistics, normalisation, activation; the activation's backward, then the
normalisation's two); :file:`bn_act.cpp` does the forward in two passes and the backward in two,
without the intermediate tensors. :class:`BatchNormAct` is ``nn.BatchNorm2d`` (its own parameters
and buffers, so the same state_dict) that applies the activation too; :func:`vae.fast.accelerate`
puts it in place of a ``BatchNorm2d`` and turns the ``LeakyReLU`` after it into ``nn.Identity``.

The kernels are compiled on first use with the machine's C++ compiler (``$CXX``, else ``g++``),
once per machine and source, into ``$VAE_CACHE_DIR/kernels``; where none builds them, the form is
not applied and the model keeps the plain layers (:func:`library` warns once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vae import settings

__all__ = ["BatchNormAct", "library"]

# bn_act_conv.cpp: BatchNorm + LeakyReLU + the output conv (vae.fast.bn_act_conv), in the same library
SOURCES = tuple(Path(__file__).with_name(name) for name in ("bn_act.h", "bn_act.cpp", "bn_act_conv.cpp"))
# -ffp-contract=off: the backward recomputes x*a + b exactly as the forward did (same LeakyReLU mask).
# -fno-trapping-math: without it g++ keeps the LeakyReLU's select a branch wherever vectors have no
# masks (AVX2: 12x slower on random signs, Zen 3); the results are the same bits.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-shared",
         "-fPIC")
_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
_SIGNATURES = {  # name -> argument types (pointers as c_void_p: data_ptr() of CPU tensors)
    "forward": (_P, _P, _L, _L, _L, _I, _P, _P, _D, _D, _P, _P, _D, _P, _P, _P, _P),
    "apply": (_P, _P, _L, _L, _L, _I, _P, _P, _P, _P, _D, _D),
    "backward": (_P, _P, _P, _L, _L, _L, _I, _P, _P, _D, _P, _P, _P, _P),
    "conv_forward": (_P, _P, _L, _L, _L, _L, _L, _L, _I, _P, _P, _D, _D, _P, _P, _D, _P, _P, _P, _P, _P, _P),
    "conv_apply": (_P, _P, _L, _L, _L, _L, _L, _L, _I, _P, _P, _P, _P, _D, _D, _P, _P),
    "conv_backward": (_P, _P, _P, _L, _L, _L, _L, _L, _L, _I, _P, _P, _D, _P, _P, _P, _P, _P, _P, _P),
}
DTYPES = {torch.float32: "f32", torch.float64: "f64"}  # what the kernels compute in -> suffix


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.platform() + platform.processor()


def _build(compiler: str, dest: Path) -> None:
    """Compile SOURCES into ``dest``, atomically (a half-written library is never loaded)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        sources = [str(f) for f in SOURCES if f.suffix == ".cpp"]
        subprocess.run([compiler, *FLAGS, *sources, "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on the first call, then loaded from the cache), or None where
    no compiler builds them: then :func:`vae.fast.accelerate` keeps the plain layers."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("vae.fast: no C++ compiler found (set CXX), so BatchNorm + LeakyReLU stay the plain "
                      "layers", RuntimeWarning, stacklevel=2)
        return None
    parts = [*(f.read_text() for f in SOURCES), *FLAGS, compiler, _machine()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    path = settings.current().cache_dir / "kernels" / f"bn_act-{key}.so"
    try:
        if not path.is_file():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))  # after torch: its libgomp (the same soname) is the one used
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(f"vae.fast: building the BatchNorm + LeakyReLU kernel failed ({str(detail).strip()[:500]}), "
                      f"so those layers stay plain", RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        for suffix in DTYPES.values():
            fn = getattr(lib, f"bn_act_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    return lib


def kernel(name: str, dtype: torch.dtype):
    """The compiled function ``bn_act_<name>`` for ``dtype`` (one of DTYPES)."""
    return getattr(library(), f"bn_act_{name}_{DTYPES[dtype]}")


def _view(x: torch.Tensor) -> tuple[int, int, int]:
    """(O, C, I) of a channels-last (rows of C channels) or contiguous (planes) 4-d tensor."""
    n, c, h, w = x.shape
    return (n * h * w, c, 1) if x.is_contiguous(memory_format=torch.channels_last) else (n, c, h * w)


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for the kernels; None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


class _Function(torch.autograd.Function):
    """y = leaky_relu(batch_norm(x, training statistics), slope); running statistics updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float, slope: float):
        o, c, i = _view(x)
        y = torch.empty_like(x)
        mean, invstd = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
        a, b = torch.empty_like(weight), torch.empty_like(weight)
        kernel("forward", x.dtype)(x.data_ptr(), y.data_ptr(), o, c, i, torch.get_num_threads(),
                                   weight.data_ptr(), bias.data_ptr(), eps, slope, pointer(running_mean),
                                   pointer(running_var), factor, mean.data_ptr(), invstd.data_ptr(),
                                   a.data_ptr(), b.data_ptr())
        ctx.save_for_backward(x)
        ctx.stats, ctx.slope = (a, b, mean, invstd), slope
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a, b, mean, invstd = ctx.stats
        o, c, i = _view(x)
        grad = grad.contiguous(memory_format=torch.channels_last if i == 1 else torch.contiguous_format)
        dx, dweight, dbias = torch.empty_like(x), torch.empty_like(a), torch.empty_like(a)
        kernel("backward", x.dtype)(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), o, c, i, torch.get_num_threads(),
                                    a.data_ptr(), b.data_ptr(), ctx.slope, mean.data_ptr(), invstd.data_ptr(),
                                    dweight.data_ptr(), dbias.data_ptr())
        return dx, dweight, dbias, None, None, None, None, None


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the kernels can compute a BatchNorm of ``x`` with ``weight``: a 4-d CPU tensor in
    one of DTYPES (the weight's too), more than one value per channel, no autocast, not under
    ``torch.compile``, and the library built. The memory layout is each caller's own check."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype in DTYPES and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and library() is not None)


def momentum_factor(norm: nn.BatchNorm2d) -> tuple[float, bool]:
    """(the running statistics' update factor, whether to update them) for one training-statistics
    forward of ``norm``, counting the step as ``nn.BatchNorm2d`` does: momentum, or a cumulative
    average when momentum is None."""
    update = norm.training and norm.track_running_stats
    factor = 0.0
    if update and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return factor, update


class BatchNormAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``nn.LeakyReLU(slope)``, computed by the fused kernel on
    CPU float32/float64 tensors in channels-last or contiguous memory; by the plain ops otherwise
    (autocast, ``torch.compile``, other devices and dtypes, one value per channel, a gradient
    through evaluation mode)."""

    slope: float = 0.01

    @classmethod
    def fits(cls, norm: nn.Module, act: nn.Module) -> bool:
        """True for a plain affine ``BatchNorm2d`` followed by a ``LeakyReLU``."""
        return type(norm) is nn.BatchNorm2d and type(act) is nn.LeakyReLU and norm.affine

    @classmethod
    def from_plain(cls, norm: nn.BatchNorm2d, act: nn.LeakyReLU) -> "BatchNormAct":
        with torch.device("meta"):
            twin = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        twin.weight, twin.bias = norm.weight, norm.bias
        twin.running_mean, twin.running_var = norm.running_mean, norm.running_var
        twin.num_batches_tracked = norm.num_batches_tracked
        twin.slope = act.negative_slope
        return twin.train(norm.training)

    def _fused(self, x: torch.Tensor) -> bool:
        return kernel_applies(x, self.weight) and (
            x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None
        if not self._fused(x) or (not batch_stats and torch.is_grad_enabled() and x.requires_grad):
            return F.leaky_relu(super().forward(x), self.slope)
        if not batch_stats:  # running statistics, no gradient: one pass
            o, c, i = _view(x)
            y = torch.empty_like(x)
            kernel("apply", x.dtype)(x.data_ptr(), y.data_ptr(), o, c, i, torch.get_num_threads(),
                                     self.running_mean.data_ptr(), self.running_var.data_ptr(),
                                     self.weight.data_ptr(), self.bias.data_ptr(), self.eps, self.slope)
            return y
        factor, update = momentum_factor(self)
        return _Function.apply(x, self.weight, self.bias, self.running_mean if update else None,
                               self.running_var if update else None, factor, self.eps, self.slope)
