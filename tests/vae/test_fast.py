"""vae.fast: the twins compute the plain layers' function, accelerate() swaps them in only where
they were measured, keeps every parameter and state_dict key, and says which form each layer took."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vae import fast
from vae.fast import bn_act, gemm
from vae.fast.bn_act import BatchNormAct
from vae.fast.layers import Conv2d, ConvTranspose2d, OutputConv
from vae.model import VAE

CL = torch.channels_last
needs_onednn = pytest.mark.skipif(not gemm.available(), reason="this PyTorch build has no oneDNN matmul op")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _outputs_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [y, x.grad, *(p.grad for p in layer.parameters())]


def _twin(plain: nn.Module, **kwargs) -> nn.Module:
    twin = copy.deepcopy(plain)
    if isinstance(plain, nn.ConvTranspose2d):
        return ConvTranspose2d.from_plain(twin, **kwargs)
    return OutputConv.from_plain(twin) if OutputConv.fits(twin) and not kwargs else Conv2d.from_plain(twin, **kwargs)


# -- each twin computes its plain layer ----------------------------------------------------------------
@pytest.mark.parametrize("make, shape, matmul", [
    (lambda: nn.Conv2d(1, 32, 3, stride=2, padding=1), (4, 1, 28, 28), False),
    (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1), (4, 64, 7, 7), False),
    (lambda: nn.Conv2d(128, 256, 3, stride=2, padding=1), (4, 128, 4, 4), True),
    (lambda: nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), (4, 64, 7, 7), False),
    (lambda: nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), (4, 256, 2, 2), True),
    (lambda: nn.Conv2d(32, 1, 3, padding=1), (4, 32, 28, 28), None),  # the output conv
    (lambda: nn.Conv2d(8, 3, 5, padding=2), (3, 8, 9, 11), None),  # RGB output, a 5×5 kernel, a non-square image
    (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), (2, 4, 5, 5), False),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_twins_compute_the_plain_layers_function_and_gradients_in_float64(make, shape, matmul, channels_last):
    plain = make().double()
    twin = _twin(plain) if matmul is None else _twin(plain, matmul=matmul)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        plain, twin, x = plain.to(memory_format=CL), twin.to(memory_format=CL), x.contiguous(memory_format=CL)
    for ours, reference in zip(_outputs_and_grads(twin, x), _outputs_and_grads(plain, x)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_twins_share_the_plain_layers_parameters():
    plain = nn.Conv2d(3, 4, 3, padding=1)
    twin = Conv2d.from_plain(plain, matmul=False)
    assert twin.weight is plain.weight and twin.bias is plain.bias
    assert twin.state_dict().keys() == plain.state_dict().keys()


def test_output_conv_passes_gradcheck():
    layer = OutputConv.from_plain(nn.Conv2d(3, 2, 3, padding=1).double())
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda inp, weight, bias: torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (inp,)), (x, w, b))


def test_output_conv_under_bf16_autocast_stays_close_to_float32():
    plain, x = nn.Conv2d(32, 1, 3, padding=1), torch.randn(4, 32, 28, 28)
    layer = OutputConv.from_plain(copy.deepcopy(plain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, plain(x), rtol=0.05, atol=0.1)


def test_output_conv_fits_only_a_same_padded_stride_1_conv_with_few_outputs():
    assert OutputConv.fits(nn.Conv2d(32, 1, 3, padding=1))
    assert not OutputConv.fits(nn.Conv2d(32, 8, 3, padding=1))  # too many output channels
    assert not OutputConv.fits(nn.Conv2d(32, 1, 4, padding=2))  # even kernel
    assert not OutputConv.fits(nn.Conv2d(32, 1, 3, stride=2, padding=1))
    assert not OutputConv.fits(nn.Conv2d(32, 1, 3, padding=1, bias=False))
    assert not OutputConv.fits(nn.Linear(3, 1))


# -- accelerate() ----------------------------------------------------------------------------------------
@needs_onednn
def test_the_default_model_takes_the_matrix_form_exactly_at_its_2x2_layers():
    model = fast.accelerate(VAE().to(memory_format=CL), "cpu")
    forms = fast.forms(model)
    assert [name for name, form in forms.items() if "matmul" in form] == ["encoder.3.0", "decoder.0.0"]
    built = bn_act.library() is not None  # the fused forms need the compiled kernels
    assert forms["final_layer.1"] == ("bn_act_conv" if built else "output_conv")
    assert {forms[name] for name in ("fc_mu", "fc_log_var", "decoder_input")} == {"plain"}
    assert sum(form == "bias_after" for form in forms.values()) == 6
    assert sum(form == "bn_act" for form in forms.values()) == (7 if built else 0)  # the 8th: bn_act_conv


def test_a_contiguous_model_keeps_pytorchs_convolutions():
    forms = fast.forms(fast.accelerate(VAE(), "cpu"))
    assert not any("matmul" in form for form in forms.values())
    assert forms["encoder.3.0"] == "bias_after"


@pytest.mark.parametrize("dtype, device", [(torch.float64, "cpu"), (torch.bfloat16, "cpu"), (torch.float32, "meta")])
def test_accelerate_changes_nothing_where_it_was_not_measured(dtype, device):
    model = VAE(hidden_dims=[8, 16], latent_dim=2).to(dtype)
    fast.accelerate(model, device)
    assert set(fast.forms(model).values()) == {"plain"}


def test_enabled_false_keeps_the_plain_model():
    """``enabled=cfg.run.fast`` is how the trainer, evaluation and pipelines switch the fast path."""
    model = VAE(hidden_dims=[8, 16], latent_dim=2).to(memory_format=CL)
    assert fast.accelerate(model, "cpu", enabled=False) is model
    assert set(fast.forms(model).values()) == {"plain"}
    assert "bias_after" in fast.forms(fast.accelerate(model, "cpu", enabled=True)).values()


def test_include_picks_the_forms():
    forms = fast.forms(fast.accelerate(VAE().to(memory_format=CL), "cpu", include=("output_conv",)))
    assert set(forms.values()) == {"plain", "output_conv"}
    with pytest.raises(ValueError, match="unknown fast forms"):
        fast.accelerate(VAE(), "cpu", include=("warp",))


@pytest.mark.parametrize("decoder", ["conv", "autoregressive"])
def test_accelerate_keeps_the_state_dict_and_the_random_stream(decoder):
    model = VAE(hidden_dims=[8, 16, 32], latent_dim=4, decoder=decoder).to(memory_format=CL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    fast.accelerate(model, "cpu")
    after_draw = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after_draw, torch.rand(1))  # the probe forward drew nothing from the global stream
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)
    VAE(hidden_dims=[8, 16, 32], latent_dim=4, decoder=decoder).load_state_dict(state)  # and back


@needs_onednn
def test_the_accelerated_model_in_float32_matches_the_plain_model_in_float64():
    """The whole model, channels-last float32 with every form, against the plain torch.nn model in
    float64: reconstructions, latents and every parameter's gradient."""
    plain = VAE(hidden_dims=(8, 16, 32, 64), latent_dim=6)
    ours = fast.accelerate(copy.deepcopy(plain).to(memory_format=CL), "cpu")
    assert any("matmul" in form for form in fast.forms(ours).values())
    plain = plain.double()
    x, eps = torch.rand(16, 1, 28, 28), torch.randn(16, 6)
    results = []
    for model, inp in ((ours, x.contiguous(memory_format=CL)), (plain, x.double())):
        mu, log_var = model.encode(inp)
        recon = model.decode(mu + torch.exp(0.5 * log_var) * eps.to(mu.dtype))  # the same noise for both
        ((recon - inp) ** 2).sum().backward()
        results.append(((recon, mu, log_var), [p.grad for p in model.parameters()]))
    (outs32, grads32), (outs64, grads64) = results
    for a, b in zip(outs32, outs64):
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-4, atol=1e-4)
    scale = max(float(g.abs().max()) for g in grads64)
    for (name, _), a, b in zip(ours.named_parameters(), grads32, grads64):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_the_accelerated_model_in_float64_is_the_plain_function_exactly():
    """In float64 (twins built by hand: accelerate() itself leaves float64 alone) training and
    evaluation outputs and gradients agree to rounding."""
    plain = VAE(hidden_dims=(8, 16, 32), latent_dim=4).double()
    ours = copy.deepcopy(plain)
    for name, module in list(ours.named_modules()):
        if type(module) in (nn.Conv2d, nn.ConvTranspose2d):
            twin = _twin(module) if OutputConv.fits(module) else _twin(module, matmul=False)
            parent, _, child = name.rpartition(".")
            setattr(ours.get_submodule(parent), child, twin)
    for seq in [m for m in ours.modules() if type(m) is nn.Sequential]:
        for i in range(len(seq) - 1):
            if BatchNormAct.fits(seq[i], seq[i + 1]):
                seq[i], seq[i + 1] = BatchNormAct.from_plain(seq[i], seq[i + 1]), nn.Identity()
    assert sum(isinstance(m, BatchNormAct) for m in ours.modules()) == 6
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    outputs = []
    for model in (ours, plain):
        torch.manual_seed(1)
        recon, mu, log_var = model(x)
        ((recon - x) ** 2).sum().backward()
        outputs.append((recon, mu, log_var))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Conv biases that feed a BatchNorm have zero gradient in exact arithmetic: both give rounding
    # noise there, so the absolute tolerance is scaled by the largest gradient.
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12 * scale, msg=name)
    ours.eval(), plain.eval()
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.decode(z), plain.decode(z), rtol=1e-10, atol=1e-10)

