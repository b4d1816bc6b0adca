"""vae.fast.bn_act_conv: the fused last stage (BatchNorm, LeakyReLU, output conv) is the same
function as the plain layers, in training and evaluation, forward and backward, with the same
running statistics; accelerate() applies it to the decoder's last stage and keeps the state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vae import fast
from vae.fast import bn_act
from vae.fast.bn_act_conv import NormActConv
from vae.model import VAE

CL = torch.channels_last
pytestmark = pytest.mark.skipif(bn_act.library() is None, reason="no C++ compiler builds vae/fast/bn_act*.cpp")


def _stage(channels: int, outputs: int, kernel: int, dtype=torch.float64, momentum: float | None = 0.1):
    torch.manual_seed(0)
    stage = nn.Sequential(
        nn.Sequential(nn.ConvTranspose2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels, momentum=momentum),
                      nn.LeakyReLU(0.2)),
        nn.Conv2d(channels, outputs, kernel, padding=kernel // 2)).to(dtype)
    with torch.no_grad():
        stage[0][1].weight.uniform_(0.5, 1.5), stage[0][1].bias.uniform_(-1, 1)
    return stage, NormActConv.from_plain(copy.deepcopy(stage))


def _run(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize(("channels", "outputs", "kernel", "size"),
                         [(32, 1, 3, (28, 28)), (6, 3, 5, (7, 8)), (4, 2, 3, (1, 2)), (5, 4, 1, (3, 3))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_the_plain_layers_in_float64(channels, outputs, kernel, size, momentum):
    plain, twin = _stage(channels, outputs, kernel, momentum=momentum)
    x = (torch.randn(4, channels, *size, dtype=torch.float64) * 3 + 2).contiguous(memory_format=CL)
    grad = torch.randn(4, outputs, *size, dtype=torch.float64)
    for _ in range(2):  # twice: the running statistics and the step count accumulate the same way
        for p in (*plain.parameters(), *twin.parameters()):
            p.grad = None
        y, dx, grads = _run(twin, x, grad)
        y_ref, dx_ref, grads_ref = _run(plain, x, grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-11)
        scale = max(float(g.abs().max()) for g in grads_ref)
        for (name, _), ours, ref in zip(plain.named_parameters(), grads, grads_ref):
            # the transposed conv's bias feeds the BatchNorm: its exact gradient is 0, both give rounding noise
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12 * scale, msg=name)
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=CL)
    norm, ref = twin[0][1], plain[0][1]
    torch.testing.assert_close(norm.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(norm.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_float32_stays_within_rounding_of_float64():
    plain, twin = _stage(32, 1, 3, torch.float32)
    x = (torch.randn(8, 32, 28, 28) * 2 + 1).contiguous(memory_format=CL)
    grad = torch.randn(8, 1, 28, 28)
    y, dx, grads = _run(twin, x, grad)
    y_ref, dx_ref, grads_ref = _run(plain.double(), x.double(), grad.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[-2].double(), grads_ref[-2], rtol=1e-4, atol=1e-4)  # the output conv's weight


def test_evaluation_uses_the_running_statistics():
    plain, twin = _stage(6, 2, 3)
    x = torch.randn(5, 6, 4, 3, dtype=torch.float64).contiguous(memory_format=CL)
    for _ in range(3):
        twin(x * 2 + 1), plain(x * 2 + 1)
    twin.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), plain(x), rtol=1e-12, atol=1e-12)
    _, dx, _ = _run(twin, x, torch.ones(5, 2, 4, 3, dtype=torch.float64))  # a gradient in evaluation mode
    _, dx_ref, _ = _run(plain, x, torch.ones(5, 2, 4, 3, dtype=torch.float64))
    torch.testing.assert_close(dx, dx_ref)


def test_what_the_kernel_does_not_cover_runs_the_layers():
    plain, twin = _stage(4, 1, 3, torch.float32)
    x = torch.randn(3, 4, 5, 5)  # contiguous memory
    torch.testing.assert_close(twin(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(twin(x.contiguous(memory_format=CL)), plain(x.contiguous(memory_format=CL)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # one value per channel
        twin(torch.randn(1, 4, 1, 1).contiguous(memory_format=CL))


def test_gradcheck():
    _, twin = _stage(3, 2, 3)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_(True)
    names = [name for name, _ in twin.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in twin.parameters()]
    assert torch.autograd.gradcheck(
        lambda inp, *ps: torch.func.functional_call(twin, dict(zip(names, ps)), (inp,)), (x, *params))


def test_accelerate_fuses_the_decoders_last_stage_and_keeps_the_state_dict():
    model = VAE(hidden_dims=[8, 16, 32], latent_dim=4).to(memory_format=CL)
    keys = model.state_dict().keys()
    fast.accelerate(model, "cpu")
    forms = fast.forms(model)
    assert isinstance(model.final_layer, NormActConv)
    assert [name for name, form in forms.items() if form == "bn_act_conv"] == ["final_layer.0.1", "final_layer.1"]
    assert model.state_dict().keys() == keys
    VAE(hidden_dims=[8, 16, 32], latent_dim=4).load_state_dict(model.state_dict())
    without = fast.forms(fast.accelerate(VAE(hidden_dims=[8], latent_dim=2).to(memory_format=CL), "cpu",
                                         include=tuple(f for f in fast.FORMS if f != "bn_act_conv")))
    assert (without["final_layer.0.1"], without["final_layer.1"]) == ("bn_act", "output_conv")
    contiguous = fast.forms(fast.accelerate(VAE(hidden_dims=[8], latent_dim=2), "cpu"))
    assert contiguous["final_layer.1"] == "output_conv"  # its input is contiguous: the children's forms run
    ar = fast.accelerate(VAE(hidden_dims=[8], latent_dim=2, decoder="autoregressive").to(memory_format=CL), "cpu")
    assert "bn_act_conv" not in fast.forms(ar).values()  # no output conv after its last stage
