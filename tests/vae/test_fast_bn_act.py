"""vae.fast.bn_act: the compiled BatchNorm + LeakyReLU is nn.BatchNorm2d then nn.LeakyReLU, in
training and evaluation, in both memory layouts; accelerate() fuses each pair and keeps the
state_dict; without a compiler the plain layers stay, with a warning."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from vae import fast
from vae.fast import bn_act
from vae.fast.bn_act import BatchNormAct
from vae.model import VAE

CL = torch.channels_last
pytestmark = pytest.mark.skipif(bn_act.library() is None, reason="no C++ compiler builds vae/fast/bn_act.cpp")


def _pair(channels: int, dtype=torch.float64, momentum: float | None = 0.1):
    torch.manual_seed(0)
    norm, act = nn.BatchNorm2d(channels, momentum=momentum).to(dtype), nn.LeakyReLU(0.2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    return norm, act, BatchNormAct.from_plain(copy.deepcopy(norm), act)


def _run(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (3, 8, 1, 2), (16, 32, 28, 28)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_batchnorm_then_leaky_relu_in_float64(shape, channels_last, momentum):
    norm, act, twin = _pair(shape[1], momentum=momentum)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5  # a mean far from 0: the variance must not cancel
    grad = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x, grad = x.contiguous(memory_format=CL), grad.contiguous(memory_format=torch.contiguous_format)
    for _ in range(2):  # twice: the running statistics and the step count accumulate the same way
        y, dx = _run(twin, x, grad)
        y_ref, dx_ref = _run(nn.Sequential(norm, act), x, grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    for ours, ref in ((twin.weight.grad, norm.weight.grad), (twin.bias.grad, norm.bias.grad),
                      (twin.running_mean, norm.running_mean), (twin.running_var, norm.running_var)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert int(twin.num_batches_tracked) == int(norm.num_batches_tracked) == 2


def test_float32_stays_within_rounding_of_float64():
    norm, act, twin = _pair(32, torch.float32)
    x = (torch.randn(8, 32, 14, 14) * 2 + 1).contiguous(memory_format=CL)
    y = twin(x)
    y_ref = act(norm.double()(x.double()))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_evaluation_uses_the_running_statistics(channels_last):
    norm, act, twin = _pair(6)
    x = torch.randn(5, 6, 4, 3, dtype=torch.float64)
    x = x.contiguous(memory_format=CL) if channels_last else x
    for _ in range(3):
        twin(x * 2 + 1), norm(x * 2 + 1)
    twin.eval(), norm.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), act(norm(x)), rtol=1e-12, atol=1e-12)
    y, dx = _run(twin, x, torch.ones_like(x))  # a gradient in evaluation mode: the plain ops give it
    y_ref, dx_ref = _run(nn.Sequential(norm, act), x, torch.ones_like(x))
    torch.testing.assert_close(dx, dx_ref)


def test_what_the_kernel_does_not_cover_runs_the_plain_ops():
    norm, act, twin = _pair(4, torch.float32)
    x = torch.randn(3, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast
        torch.testing.assert_close(twin(x), act(norm(x)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # one value per channel
        twin(torch.randn(1, 4, 1, 1))
    strided = torch.randn(3, 4, 10, 5)[:, :, ::2]  # neither layout
    torch.testing.assert_close(twin(strided), act(norm(strided)))


def test_gradcheck():
    _, _, twin = _pair(3)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w, b = (p.detach().clone().requires_grad_(True) for p in (twin.weight, twin.bias))
    assert torch.autograd.gradcheck(
        lambda inp, weight, bias: torch.func.functional_call(twin, {"weight": weight, "bias": bias}, (inp,)),
        (x.contiguous(memory_format=CL), w, b))


def test_accelerate_fuses_each_pair_and_keeps_the_state_dict():
    model = VAE(hidden_dims=[8, 16, 32], latent_dim=4).to(memory_format=CL)
    keys = model.state_dict().keys()
    fast.accelerate(model, "cpu")
    forms = fast.forms(model)
    assert [name for name, form in forms.items() if form == "bn_act"] == [
        "encoder.0.1", "encoder.1.1", "encoder.2.1", "decoder.0.1", "decoder.1.1"]  # final_layer.0.1: bn_act_conv
    assert not any(isinstance(m, nn.LeakyReLU) for m in model.modules())
    assert model.state_dict().keys() == keys
    VAE(hidden_dims=[8, 16, 32], latent_dim=4).load_state_dict(model.state_dict())
    plain = fast.forms(fast.accelerate(VAE(hidden_dims=[8], latent_dim=2), "cpu", include=("bias_after",)))
    assert plain["encoder.0.1"] == "plain"


def test_without_a_compiler_the_plain_layers_stay_with_a_warning(tmp_path):
    """A fresh process whose compiler fails (CXX=false) and whose cache is empty."""
    code = ("import warnings, torch; from vae import fast; from vae.model import VAE\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    forms = fast.forms(fast.accelerate(VAE(hidden_dims=[8], latent_dim=2), 'cpu'))\n"
            "print(forms['encoder.0.1'], '|', '; '.join(str(x.message) for x in w))\n")
    env = {"CXX": "false", "VAE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    form, message = out.strip().split(" | ")
    assert form == "plain"
    assert "building the BatchNorm + LeakyReLU kernel failed" in message
    assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-built left to load


def test_the_kernel_is_built_once_into_the_cache(tmp_path):
    code = "from vae.fast import bn_act; print(bn_act.library()._name)"
    env = {"VAE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    built = list(tmp_path.glob("kernels/bn_act-*.so"))
    assert [str(p) for p in built] == [first.strip()]
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert second == first and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
