"""vae.fast.gemm: small-map convolutions as oneDNN matrix products.

Each float32 fast form is compared, outputs and every gradient, with the torch.nn.functional op in
float64 (where the model takes them: tests/vae/test_fast.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vae.fast import gemm

needs_onednn = pytest.mark.skipif(not gemm.available(), reason="this PyTorch build has no oneDNN matmul op")
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _run(fn, *inputs):
    """fn(*inputs) and the gradients of <y, g> for a fixed g, for the inputs that require grad."""
    y = fn(*inputs)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, wrt, g)]


def _compare(fast, reference, *inputs, rtol=2e-5):
    """fast(float32 inputs) against reference(float64 inputs): the output and every gradient."""
    ins32 = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    ins64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    got, want = _run(fast, *ins32), _run(reference, *ins64)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * scale)
    return got


@needs_onednn
@pytest.mark.parametrize("shape, out_c, k, stride, pad", [
    ((6, 128, 4, 4), 64, 3, 2, 1),   # the seed's 128->256 layer, narrower: 4x4 -> 2x2
    ((3, 5, 3, 3), 7, 3, 2, 1),      # odd input: 3x3 -> 2x2
    ((2, 4, 4, 6), 3, 3, 2, 1),      # non-square: 4x6 -> 2x3
    ((2, 4, 2, 2), 5, 3, 1, 1),      # stride 1, 'same' padding
    ((2, 6, 3, 3), 2, 1, 1, 0),      # 1x1 kernel
    ((2, 3, 5, 5), 4, 5, 2, 2),      # 5x5 kernel
    ((1, 3, 4, 4), 2, 2, 2, 0),      # even kernel, no padding
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_conv2d_matches_f_conv2d(shape, out_c, k, stride, pad, bias, layout):
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(out_c, shape[1], k, k).contiguous(memory_format=layout).requires_grad_()
    b = torch.randn(out_c, requires_grad=True) if bias else None
    y = _compare(lambda x, w, b: gemm.conv2d(x, w, b, stride, pad),
                 lambda x, w, b: F.conv2d(x, w, b, stride, pad), x, w, b)[0]
    assert y.is_contiguous(memory_format=CL)


@needs_onednn
@pytest.mark.parametrize("shape, out_c, k, stride, pad, out_pad", [
    ((6, 128, 2, 2), 64, 3, 2, 1, 1),  # the seed's 256->128 layer, narrower: 2x2 -> 4x4
    ((3, 5, 2, 2), 7, 3, 2, 1, 0),     # 2x2 -> 3x3
    ((2, 4, 2, 3), 3, 3, 2, 1, 1),     # non-square: 2x3 -> 4x6
    ((2, 4, 1, 1), 5, 3, 2, 1, 1),     # one position -> 2x2
    ((2, 4, 2, 2), 3, 3, 1, 1, 0),     # stride 1
    ((2, 3, 2, 2), 4, 4, 2, 1, 0),     # even kernel: 2x2 -> 4x4
    ((2, 3, 2, 2), 2, 5, 2, 2, 1),     # 5x5 kernel
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose2d_matches_f_conv_transpose2d(shape, out_c, k, stride, pad, out_pad, bias):
    x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(shape[1], out_c, k, k).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(out_c, requires_grad=True) if bias else None
    y = _compare(lambda x, w, b: gemm.conv_transpose2d(x, w, b, stride, pad, out_pad),
                 lambda x, w, b: F.conv_transpose2d(x, w, b, stride, pad, out_pad), x, w, b)[0]
    assert y.is_contiguous(memory_format=CL)


@needs_onednn
def test_fast_forms_are_once_differentiable():
    x = torch.randn(2, 4, 4, 4, requires_grad=True).contiguous(memory_format=CL)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(gemm.conv2d(x, w, None, 2, 1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


@needs_onednn
def test_usable_only_for_cpu_float32_without_autocast():
    x = torch.randn(2, 3)
    assert gemm.usable(x, x)
    assert not gemm.usable(x, x.double())
    assert not gemm.usable(x.bfloat16())
    assert gemm.usable(x, None) and not gemm.usable(x.double(), None)  # an absent bias is skipped
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.usable(x)
