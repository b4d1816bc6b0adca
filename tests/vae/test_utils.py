"""vae.utils: EMA, checkpoints (atomic, weights_only), optimiser groups, LR schedules, seeding, and the
retained heap training runs under."""

from __future__ import annotations

import copy
import math
import platform
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vae.config import ConfigError
from vae.model import VAE
from vae.utils import (CHECKPOINT_FORMAT, EMA, CheckpointError, FlatParameters, create_lr_scheduler, create_optimizer,
                       get_device, gradient_clip, load_checkpoint, load_model, retained_heap, save_checkpoint, set_seed)


def test_ema_follows_the_weights_with_warm_up_decay():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay = min(0.9, 2/11)
    assert float(ema.module.weight[0, 0]) == pytest.approx(1 - 2 / 11)


def test_ema_averages_float_buffers_and_copies_integer_ones():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    model.running_mean.fill_(5.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # first update: decay = min(0.9, 2/11), from running_mean 0
    torch.testing.assert_close(ema.module.running_mean, torch.full((3,), 5.0 * (1 - 2 / 11)))
    assert int(ema.module.num_batches_tracked) == 7


def test_ema_never_trains():
    ema = EMA(nn.BatchNorm1d(3), decay=0.99)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_works_for_a_model_without_buffers():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight)


def test_ema_state_dict_round_trips():
    model = nn.Linear(2, 2)
    a = EMA(model, 0.9)
    a.update(model)
    b = EMA(nn.Linear(2, 2), 0.5)
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.9 and b.num_updates == 1
    torch.testing.assert_close(b.module.weight, a.module.weight)


def test_checkpoint_round_trips_plain_data(tmp_path):
    state = {"epoch": 3, "weights": torch.arange(4.0), "config": {"hidden_dims": [8, 16]}}
    path = save_checkpoint(state, tmp_path / "run" / "last.pth")
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT and loaded["epoch"] == 3 and loaded["config"]["hidden_dims"] == [8, 16]
    assert torch.equal(loaded["weights"], torch.arange(4.0))


def test_checkpoint_write_leaves_no_temporary_files(tmp_path):
    save_checkpoint({"a": 1}, tmp_path / "x.pth")
    save_checkpoint({"a": 2}, tmp_path / "x.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]
    assert load_checkpoint(tmp_path / "x.pth")["a"] == 2


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    save_checkpoint({"a": 1}, tmp_path / "x.pth")
    with pytest.raises(Exception):
        save_checkpoint({"a": lambda: None}, tmp_path / "x.pth")  # cannot be pickled
    assert load_checkpoint(tmp_path / "x.pth")["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*none.pth"):
        load_checkpoint(tmp_path / "none.pth")


def test_foreign_dict_is_not_a_vae_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a vae checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_newer_checkpoint_format_is_refused(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT + 1}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(tmp_path / "new.pth")


def test_load_model_rebuilds_the_vae_with_ema_weights(trained_checkpoint):
    model, state = load_model(trained_checkpoint)
    assert isinstance(model, VAE) and not model.training and model.latent_dim == 4
    torch.testing.assert_close(model.state_dict()["fc_mu.weight"], state["ema_state"]["module"]["fc_mu.weight"])
    raw, _ = load_model(trained_checkpoint, use_ema=False)
    torch.testing.assert_close(raw.state_dict()["fc_mu.weight"], state["model_state"]["fc_mu.weight"])


def test_optimizer_does_not_decay_biases_and_norms():
    opt = create_optimizer(VAE(hidden_dims=[4], latent_dim=2), 1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim > 1 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def _lrs(kind, total, warmup=0):
    """The learning rate of steps 0..total (base rate 1)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_lr_scheduler(opt, kind, total, warmup)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_decays_from_1_to_1_percent():
    lrs = _lrs("cosine", 100)
    assert lrs[0] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.01)
    assert lrs[50] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_schedule_drops_tenfold_at_thirds():
    lrs = _lrs("step", 90)
    assert lrs[0] == lrs[29] == 1.0 and lrs[31] == lrs[59] == pytest.approx(0.1) and lrs[61] == pytest.approx(0.01)


def test_warm_up_is_linear():
    assert _lrs("constant", 10, warmup=4)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_gradient_clip_limits_the_norm_and_zero_disables():
    p = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.p = p
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert gradient_clip(model, 0) is None and float(p.grad.norm()) == 5.0
    assert float(gradient_clip(model, 1.0)) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0)


# -- FlatParameters: one tensor for the optimizer, the clipping and the EMA --------------------------
def _small_net():
    """Weights, biases, a 4-D channels-last weight and BatchNorm buffers; no bias feeds the norm (its
    gradient would be rounding noise, which Adam turns into steps of either sign)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).to(memory_format=torch.channels_last)


def _train(model, steps, flat=None, clip=0.5, opt_state=None, optimizer=None):
    """``steps`` AdamW steps with clipping and an EMA, as the trainer runs them; returns (optimizer, ema)."""
    ema = EMA(model, 0.9, flat=flat)
    optimizer = optimizer or create_optimizer(model, 0.05, 0.1, flat=flat)
    if opt_state is not None:
        flat.load_optimizer_state_dict(optimizer, opt_state) if flat else optimizer.load_state_dict(opt_state)
    for step in range(steps):
        x = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(step)).contiguous(
            memory_format=torch.channels_last)
        if flat is not None:
            flat.zero_grad()
            model(x).square().sum().backward()
            flat.clip_grad_norm_(clip, optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            gradient_clip(model, clip)
        optimizer.step()
        ema.update(model)
    return optimizer, ema


def _assert_same_state(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def test_flat_parameters_keep_values_layout_and_module_while_sharing_one_tensor():
    model = _small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    flat = FlatParameters(model)
    _assert_same_state(model.state_dict(), before, rtol=0, atol=0)
    assert {k: v.stride() for k, v in model.state_dict().items()} == strides  # channels-last stays
    n_params = sum(p.numel() for p in model.parameters())
    assert flat.grad.numel() == n_params and flat.tensor.numel() == n_params + 2 * 4  # + running mean, var
    base = flat.tensor.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in [*model.parameters(), model[1].running_mean])
    assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
               for p in model.parameters())
    assert flat.names[:2] == ["0.weight", "4.weight"] and flat.names[-2:] == ["1.running_mean", "1.running_var"]
    with torch.no_grad():
        flat.tensor.zero_()
    assert float(model[0].weight.detach().abs().sum()) == 0.0  # views, not copies


def test_flat_training_matches_per_tensor_training():
    """AdamW, clipping folded into the fused step, and the EMA: the same parameters, optimizer
    state (in the per-parameter form checkpoints keep) and averages as the per-tensor path."""
    plain, flat_model = _small_net(), _small_net()
    flat = FlatParameters(flat_model)
    opt_plain, ema_plain = _train(plain, 6)
    opt_flat, ema_flat = _train(flat_model, 6, flat=flat)
    _assert_same_state(flat_model.state_dict(), plain.state_dict())
    _assert_same_state(ema_flat.module.state_dict(), ema_plain.module.state_dict())
    ours, theirs = flat.optimizer_state_dict(opt_flat), opt_plain.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for pid, state in theirs["state"].items():
        _assert_same_state(ours["state"][pid], state)
        assert ours["state"][pid]["exp_avg"].stride() == state["exp_avg"].stride()


def test_flat_optimizer_resumes_from_a_per_parameter_state():
    """A checkpoint's optimizer state (the per-parameter form) loads into a flat optimizer, which
    then goes on exactly as the optimizer that wrote it."""
    plain = _small_net()
    opt_plain, _ = _train(plain, 3)
    state = copy.deepcopy(opt_plain.state_dict())
    resumed = _small_net()
    resumed.load_state_dict(plain.state_dict())
    flat = FlatParameters(resumed)
    opt_flat, _ = _train(resumed, 3, flat=flat, opt_state=state)
    _train(plain, 3, optimizer=opt_plain)
    _assert_same_state(resumed.state_dict(), plain.state_dict())
    assert int(flat.optimizer_state_dict(opt_flat)["state"][0]["step"]) == 6


def test_flat_optimizer_state_of_another_model_is_refused():
    flat = FlatParameters(_small_net())
    optimizer = create_optimizer(None, 0.1, flat=flat)
    other = create_optimizer(nn.Linear(2, 2), 0.1)
    with pytest.raises(ValueError, match=r"does not match the model: \[1, 1\] parameters per group, "
                                         r"the model has \[2, 3\]"):
        flat.load_optimizer_state_dict(optimizer, other.state_dict())


def test_flat_zero_grad_reattaches_gradients_a_caller_dropped():
    model = _small_net()
    flat = FlatParameters(model)
    model.zero_grad()  # set_to_none: the next backward would write fresh tensors, not the flat gradient
    assert model[0].weight.grad is None
    flat.zero_grad()
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    assert float(flat.grad.abs().sum()) > 0
    assert torch.equal(model[4].weight.grad.flatten(), flat.grad[model[0].weight.numel():][:model[4].weight.numel()])
    optimizer = create_optimizer(model, 0.1, flat=flat)
    optimizer.zero_grad()  # set_to_none on the group tensors: the step would skip them
    assert flat.groups[0][0].grad is None
    flat.zero_grad()
    assert flat.groups[0][0].grad.data_ptr() == flat.grad.data_ptr() and float(flat.grad.abs().sum()) == 0


def test_flat_clip_scales_the_gradients_or_hands_the_scale_to_a_fused_step():
    model = nn.Linear(2, 2, bias=False)
    flat = FlatParameters(model)
    flat.grad.copy_(torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert float(flat.clip_grad_norm_(1.0)) == pytest.approx(5.0)
    assert float(flat.grad.norm()) == pytest.approx(1.0)  # in place
    optimizer = create_optimizer(model, 0.1, flat=flat)
    flat.grad.copy_(torch.tensor([3.0, 4.0, 0.0, 0.0]))
    flat.clip_grad_norm_(1.0, optimizer)
    assert float(flat.grad.norm()) == pytest.approx(5.0)  # not yet: the fused step scales as it reads
    optimizer.step()
    assert float(flat.grad.norm()) == pytest.approx(1.0)
    assert flat.clip_grad_norm_(0, optimizer) is None and optimizer.grad_scale is None  # off: no stale scale


def test_flat_parameters_refuse_a_model_they_cannot_hold():
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParameters(nn.ReLU())
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatParameters(mixed)


def test_set_seed_seeds_python_numpy_and_torch():
    set_seed(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_get_device_picks_cpu_when_asked():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_get_device_refuses_a_missing_device_as_a_config_error():
    with pytest.raises(ConfigError, match="device: 'cuda' was asked for but is not available"):
        get_device("cuda")


# -- retained_heap ---------------------------------------------------------------------------------
# Each scenario runs in a fresh interpreter: a clean heap, so what the block leaves behind is its own.
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

_HEAP = """
import ctypes, os, threading
import torch
from vae.utils import retained_heap

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
MiB = 1 << 20

def step():  # a training-like step: eight 16 MiB activations written, alive at once, then freed
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    del blocks

def mmapped(mib):  # MiB glibc serves with mmap while a tensor of `mib` MiB lives (unmapped at its free);
    block = torch.empty(mib * MiB // 4)  # each phase asks for more than any block freed before it, so
    return libc.mallinfo2().hblkhd // MiB  # no free chunk left in the heap can serve it

def rss():  # resident MiB of this process
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // MiB
"""


def _scenario(body: str) -> dict[str, int]:
    """Run ``body`` after the helpers above in a fresh interpreter; it prints ``name value`` lines."""
    proc = subprocess.run([sys.executable, "-c", _HEAP + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {name: int(value) for name, value in (line.split() for line in proc.stdout.splitlines())}


@glibc_only
def test_retained_heap_keeps_freed_memory_in_the_process_until_the_block_ends():
    seen = _scenario("""
        with retained_heap():
            step()
            print("inside_mmapped", mmapped(256))
            print("inside_rss", rss())
        print("after_rss", rss())
        print("after_mmapped", mmapped(512))
        with retained_heap(enabled=False):
            print("disabled_mmapped", mmapped(768))
    """)
    assert seen["inside_mmapped"] < 16  # large blocks come from the heap, which keeps them when freed
    assert seen["inside_rss"] - seen["after_rss"] >= 100  # at the end the kept 128 MiB go back to the OS
    assert seen["after_mmapped"] >= 512  # glibc's defaults again: large blocks mmap'd, unmapped at free
    assert seen["disabled_mmapped"] >= 768  # off: the defaults stay


@glibc_only
def test_retained_heap_is_restored_by_the_last_of_overlapping_users():
    """Two trainers in two threads: the one that leaves first must not restore the heap under the other."""
    seen = _scenario("""
        entered, release = threading.Event(), threading.Event()
        def other_trainer():
            with retained_heap():
                entered.set()
                release.wait(timeout=60)
        thread = threading.Thread(target=other_trainer)
        thread.start()
        entered.wait(timeout=60)
        with retained_heap():
            pass  # starts after the other, ends first
        print("one_left", mmapped(256))
        release.set()
        thread.join()
        print("both_left", mmapped(512))
    """)
    assert seen["one_left"] < 16
    assert seen["both_left"] >= 512


@glibc_only
def test_retained_heap_restores_the_heap_when_the_block_raises():
    seen = _scenario("""
        try:
            with retained_heap():
                raise RuntimeError("boom")
        except RuntimeError:
            print("after", mmapped(256))
    """)
    assert seen["after"] >= 256
