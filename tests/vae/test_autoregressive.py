"""The autoregressive decoder: causal, a normalised distribution, sampling consistent with scoring."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vae.config import ConfigError, get_benchmark_config, get_default_config, validate_config
from vae.model import VAE


def _ar_vae(in_channels: int = 1, image_size: int = 28, kernel: int = 5, seed: int = 0, layers: int = 1) -> VAE:
    torch.manual_seed(seed)
    return VAE(in_channels, [4, 8], 3, image_size, decoder="autoregressive", ar_channels=8, ar_kernel=kernel,
               ar_layers=layers).eval()


def _context(i: int, j: int, k: int, layers: int) -> torch.Tensor:
    """The pixels logit (i, j) may see: each causal layer's mask-'B' taps, then the k×k mask-'A' window."""
    at = {(i, j)}
    for _ in range(layers - 1):  # above-left, above, above-right, left, itself
        at = {(r + dr, c + dc) for r, c in at for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0))}
    seen = torch.zeros(28, 28, dtype=torch.bool)
    for r, c in at:
        seen[max(r - k // 2, 0):r, max(c - k // 2, 0):c + k // 2 + 1] = True  # the rows above, inside the window
        seen[r, max(c - k // 2, 0):c] = True  # the pixels to the left in the same row
    return seen


@pytest.mark.parametrize("in_channels, layers", [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_each_logit_sees_only_the_pixels_before_it(in_channels, layers):
    model = _ar_vae(in_channels, layers=layers)
    x = torch.bernoulli(torch.full((2, in_channels, 28, 28), 0.4)).requires_grad_()
    logits = model.decode_logits(torch.randn(2, 3), x)
    i, j, k = 10, 12, 5
    logits[0, -1, i, j].backward()
    grad = x.grad[0].abs().sum(0)  # over channels
    seen = _context(i, j, k, layers)
    assert not seen[i, j:].any() and not seen[i + 1:].any()
    if layers == 1:
        assert seen.sum() == 2 * k + k // 2  # two rows above, two pixels to the left
    else:  # each layer widens the context: one more row above, one more column each side
        fewer = _context(i, j, k, layers - 1)
        assert torch.all(seen[fewer]) and seen.sum() > fewer.sum() and seen[i - k // 2 - layers + 1].any()
    assert torch.all(grad[~seen] == 0), "a logit depends on its own pixel, a later one or one outside its window"
    assert torch.count_nonzero(grad[seen]) == seen.sum()
    assert torch.all(x.grad[1] == 0), "images in a batch must not see each other"


def test_teacher_forcing_equals_a_pixelcnn_masked_convolution():
    """The gathered-window MLP is a mask-'A' convolution of x plus a 1x1 convolution of h, then 1x1 layers."""
    model, k = _ar_vae(kernel=5), 5
    head = model.ar_head
    z, x = torch.randn(3, 3), torch.bernoulli(torch.full((3, 1, 28, 28), 0.3))
    with torch.no_grad():
        h = model._features(z)
        f = h.shape[1]
        w_h, w_x = head.inp.weight[:, :f], head.inp.weight[:, f:]
        kernel = torch.zeros(head.inp.out_features, 1, k, k)
        kernel.view(head.inp.out_features, -1)[:, head.taps] = w_x
        assert torch.all(kernel[:, :, k // 2, k // 2:] == 0) and torch.all(kernel[:, :, k // 2 + 1:] == 0)
        a = F.conv2d(x, kernel, padding=k // 2) + F.conv2d(h, w_h[:, :, None, None], head.inp.bias)
        a = F.conv2d(F.leaky_relu(a, 0.2), head.hidden.weight[:, :, None, None], head.hidden.bias)
        expected = F.conv2d(F.leaky_relu(a, 0.2), head.out.weight[:, :, None, None], head.out.bias)
        assert torch.allclose(model.decode_logits(z, x), expected, atol=1e-5)


def test_a_causal_layer_is_a_3x3_convolution_with_pixelcnn_mask_b():
    from vae.autoregressive import CausalConv

    torch.manual_seed(0)
    layer, a = CausalConv(4), torch.randn(2, 4, 9, 9)
    kernel = torch.zeros(4, 4, 3, 3)
    with torch.no_grad():
        kernel[:, :, :2] = layer.conv.weight  # the row above and the centre row; the row below stays 0
        kernel[:, :, 1, 2] = 0.0  # mask 'B': not the centre row's right tap
        assert torch.allclose(layer(a), F.conv2d(a, kernel, layer.conv.bias, padding=1), atol=1e-6)
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]  # the mask is rebuilt, not saved


@pytest.mark.parametrize("layers", [1, 2])
def test_the_decoder_is_a_normalised_distribution_over_all_binary_images(layers):
    """Sum over all 2^9 binary 3x3 images of p(x|z) = 1: the product of conditionals is a distribution."""
    model = _ar_vae(image_size=3, kernel=3, layers=layers)
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9))).view(-1, 1, 3, 3)
    z = torch.randn(1, 3).expand(len(xs), 3)
    with torch.no_grad():
        logits = model.decode_logits(z, xs)
    log_p = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").flatten(1).sum(1)
    assert float(torch.logsumexp(log_p.double(), 0).exp()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("layers", [1, 3])
def test_samples_are_scored_by_teacher_forcing_with_the_same_probabilities(layers):
    model = _ar_vae(layers=layers)
    with torch.no_grad():
        h = model._features(torch.randn(4, 3))
        probs, drawn = model.ar_head.sample(h, torch.Generator().manual_seed(1))
        assert set(drawn.unique().tolist()) <= {0.0, 1.0}
        assert torch.allclose(torch.sigmoid(model.ar_head(h, drawn)), probs, atol=1e-5)
        again, _ = model.ar_head.sample(h, torch.Generator().manual_seed(1))
    assert torch.equal(probs, again)


def test_decode_without_images_samples_and_decode_logits_explains_what_it_needs():
    model = _ar_vae()
    out = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 28, 28) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match=r"decode_logits\(z, x\)"):
        model.decode_logits(torch.randn(2, 3))


def test_forward_is_teacher_forced_and_learns_what_the_previous_pixels_predict():
    """Stripes of random phase: each pixel is the opposite of its left neighbour, which only the context shows."""
    model = _ar_vae().train()
    phase = torch.randint(0, 2, (16, 1, 1, 1)).float()
    x = ((torch.arange(28).view(1, 1, 1, 28) + phase) % 2).expand(16, 1, 28, 28).contiguous()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        recon, mu, log_var = model(x)
        loss = F.binary_cross_entropy(recon, x, reduction="sum") / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 400 and losses[-1] < 50, losses[::10]  # 784·ln 2 = 543 nats for coin flips


def test_config_rejects_an_autoregressive_decoder_without_bce_and_an_even_kernel():
    with pytest.raises(ConfigError) as err:
        validate_config({**get_default_config(), "decoder": "autoregressive", "ar_kernel": 6})
    message = str(err.value)
    assert "decoder:" in message and "bce" in message
    assert "ar_kernel: must be odd" in message
    cfg = validate_config(get_benchmark_config())
    assert cfg.model.decoder == "autoregressive" and cfg.loss.reconstruction_loss_type == "bce"


def test_trainer_checkpoint_and_evaluation_work_with_the_autoregressive_decoder(tiny_config):
    from vae.evaluate import evaluate
    from vae.sample import VAESampler
    from vae.train import VAETrainer
    from vae.utils import load_model

    cfg = {**tiny_config, "decoder": "autoregressive", "ar_channels": 8, "ar_kernel": 3, "ar_layers": 2,
           "reconstruction_loss_type": "bce", "binarize": "dynamic", "num_epochs": 2}
    result = VAETrainer(cfg).train()
    assert result["status"] == "completed"
    history = [row["val/nelbo"] for row in result["history"]]
    assert history[-1] < history[0]
    model, _ = load_model(result["best_model_path"])
    assert model.autoregressive and len(model.ar_head.causal) == 1
    from vae.data import load_dataset

    metrics = evaluate(model, load_dataset(cfg["data_dir"]), loss_type="bce", binarize="dynamic", k=16,
                       probe=False, fid=False, max_test_images=50)
    assert metrics["test/iw_nll_k16"] < metrics["test/nelbo"]
    samples = VAESampler(result["best_model_path"]).sample_random(4)
    assert samples.shape == (4, 1, 28, 28)


def test_without_the_latent_the_decoder_ignores_z_and_every_bound_is_the_exact_likelihood():
    """use_latent=False (the z-removed ablation): q(z|x) = p(z), the decoder gets z = 0, so KL = 0
    and every importance weight equals p(x): the IW bound with any k is the ELBO, exactly."""
    from vae.likelihood import iw_log_weights

    torch.manual_seed(0)
    model = VAE(1, [4, 8], 3, 28, decoder="autoregressive", ar_channels=8, ar_kernel=5, use_latent=False).eval()
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    mu, log_var = model.encode(x)
    assert torch.equal(mu, torch.zeros(4, 3)) and torch.equal(log_var, torch.zeros(4, 3))
    assert torch.equal(model.decode_logits(torch.randn(4, 3), x), model.decode_logits(torch.randn(4, 3) * 9, x))
    log_w = iw_log_weights(model, x, 50, "bce", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(log_w, log_w[:, :1].expand(-1, 50), atol=1e-4), "the weights must not depend on z"
    log_px = -F.binary_cross_entropy_with_logits(model.decode_logits(mu, x), x, reduction="none").flatten(1).sum(1)
    assert torch.allclose(log_w[:, 0], log_px, atol=1e-4)
    assert model.state_dict().keys() == _ar_vae(kernel=5).state_dict().keys()


def test_the_decoder_without_the_latent_is_a_normalised_distribution():
    torch.manual_seed(0)
    model = VAE(1, [4, 8], 3, 3, decoder="autoregressive", ar_channels=8, ar_kernel=3, use_latent=False).eval()
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9))).view(-1, 1, 3, 3)
    with torch.no_grad():
        logits = model.decode_logits(torch.randn(len(xs), 3), xs)
    log_p = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").flatten(1).sum(1)
    assert float(torch.logsumexp(log_p.double(), 0).exp()) == pytest.approx(1.0, abs=1e-5)


def test_the_z_removed_ablation_trains_and_round_trips_through_a_checkpoint(tiny_config):
    from vae.data import load_dataset
    from vae.evaluate import evaluate
    from vae.train import VAETrainer
    from vae.utils import load_model

    cfg = {**tiny_config, "decoder": "autoregressive", "ar_channels": 8, "ar_kernel": 3, "use_latent": False,
           "reconstruction_loss_type": "bce", "binarize": "dynamic", "num_epochs": 2}
    result = VAETrainer(cfg).train()
    assert result["status"] == "completed"
    assert all(row["val/kl"] == 0.0 for row in result["history"])
    history = [row["val/nelbo"] for row in result["history"]]
    assert history[-1] < history[0]
    model, checkpoint = load_model(result["best_model_path"])
    assert model.use_latent is False and checkpoint["config"]["use_latent"] is False
    metrics = evaluate(model, load_dataset(cfg["data_dir"]), loss_type="bce", binarize="dynamic", k=16,
                       probe=False, fid=False, max_test_images=50)
    assert metrics["test/kl"] == 0.0 and metrics["test/active_units"] == 0
    assert metrics["test/iw_nll_k16"] == pytest.approx(metrics["test/nelbo"], abs=1e-3)
