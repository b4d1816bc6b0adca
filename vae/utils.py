"""Shared helpers: device, seeding, gradient clipping, EMA, checkpoints, optimiser and schedule,
and the process heap setting training runs under (``retained_heap``).

One checkpoint format and one ``save_checkpoint`` / ``load_checkpoint`` pair: a plain dict of
state dicts, counters and the config as plain data, written atomically (temp file, fsync,
rename) and read back with ``weights_only=True`` so a checkpoint can never run code.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import pickle
import platform
import random
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or not one of ours; the message says which."""


def get_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; otherwise the named device.

    Raises:
        ConfigError: the named device is not available here (the CLIs turn it into one line, exit 2).
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (preference == "cuda" and not torch.cuda.is_available()) or (preference == "mps" and not mps):
        from vae.config import ConfigError

        raise ConfigError([f"device: {preference!r} was asked for but is not available on this machine; "
                           f"use --device auto or cpu"])
    return torch.device(preference)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gradient_clip(model: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm in place; returns the pre-clip norm as a tensor (no host sync)."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


# glibc mallopt parameters (malloc.h) and the defaults they are restored to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
_RETAINED = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_MMAP_THRESHOLD: 1 << 30}
_heap_lock = threading.Lock()
_heap_users = 0


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def retained_heap(enabled: bool = True):
    """Keep memory that tensors free inside the process while the block runs (Linux, glibc).

    Every training step allocates and frees the same activation buffers (12.8 MB each for a
    batch of 128 at 32×28×28). glibc serves blocks that large with ``mmap`` and gives them back
    with ``munmap`` (and trims its heap top past 128 KiB), so each step the kernel maps and
    zero-fills tens of megabytes of fresh pages: a third of a CPU training step went to page
    faults (BENCHMARKS.md, "Training throughput"). Inside the block, ``mallopt`` serves large
    blocks from the heap and never trims it, so freed buffers are reused as they are; peak
    memory is unchanged (the same buffers are live at the peak), the process just keeps it.

    On exit the glibc defaults are restored (a fixed 128 KiB mmap/trim threshold: glibc's dynamic
    threshold adjustment stays off once set) and ``malloc_trim(0)`` returns the free memory.
    Nested and concurrent blocks (trainers in several threads) share one setting: the last to
    leave restores it. Elsewhere (macOS, Windows, musl) it does nothing.
    """
    global _heap_users
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            for param, value in _RETAINED.items():
                libc.mallopt(param, value)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                for param, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


def _view_like(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """flat[offset : offset + like.numel()] seen with like's shape and (dense) strides."""
    strides = torch.empty_like(like, device="meta").stride()  # like's own when dense, else contiguous
    return flat.as_strided(like.shape, strides, flat.storage_offset() + offset)


class FlatParameters:
    """A model's trainable parameters and floating-point buffers moved into one contiguous tensor.

    Every parameter's data and gradient, and every floating-point buffer, becomes a view (same
    shape, same strides: channels-last stays channels-last) into ``tensor`` and ``grad``, ordered as
    :func:`parameter_groups` lists them (weights, then biases and norms), buffers last. The
    optimizer (``create_optimizer(..., flat=)``), :meth:`clip_grad_norm_` and the EMA
    (``EMA(..., flat=)``) then do one operation per group instead of one per tensor: on the CPU each
    per-tensor operation is a thread-pool dispatch, and for the default model's 40 tensors those
    three steps took 7% of a training step (BENCHMARKS.md, "Training throughput").

    Checkpoints keep their form: the model's ``state_dict`` holds its usual tensors, and
    :meth:`optimizer_state_dict` / :meth:`load_optimizer_state_dict` convert the optimizer's state
    to and from what an optimizer over the separate parameters has. Call after every ``.to()``;
    moving the model later gives it new tensors, no longer in the flat one.
    """

    def __init__(self, model: nn.Module):
        decay, no_decay = parameter_groups(model)
        params = decay + no_decay
        if not params:
            raise ValueError("FlatParameters: the model has no trainable parameters")
        ids = {id(p) for p in params}
        names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        buffers = [b for b in model.buffers() if b.is_floating_point() and id(b) not in ids]
        tensors = params + buffers
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            raise ValueError("FlatParameters: parameters and floating-point buffers must share one dtype and device")
        self.names = [names[id(t)] for t in tensors]  # the flat order, for an EMA's shadow
        self.tensor = _flatten_(tensors)
        self.grad = torch.zeros(sum(p.numel() for p in params), dtype=self.tensor.dtype, device=self.tensor.device)
        self.groups = []  # one tensor per optimizer group: [weights], [biases and norms]
        self._layout = []  # per group: (parameter, offset in the group) pairs
        self._grads = []  # (tensor, the gradient view it must hold): every parameter and group tensor
        start = 0
        for members in (decay, no_decay):
            stop = start + sum(p.numel() for p in members)
            group, grad = self.tensor[start:stop], self.grad[start:stop]
            layout, offset = [], 0
            for p in members:
                layout.append((p, offset))
                self._grads.append((p, _view_like(grad, offset, p)))
                offset += p.numel()
            self.groups.append([group])
            self._layout.append(layout)
            self._grads.append((group, grad))
            start = stop
        self.zero_grad()

    def zero_grad(self) -> None:
        """Zero the gradients in place, re-attaching any a caller set to None (``model.zero_grad()``,
        ``optimizer.zero_grad()``)."""
        for t, g in self._grads:
            if t.grad is None or t.grad.data_ptr() != g.data_ptr():
                t.grad = g
        self.grad.zero_()

    def clip_grad_norm_(self, max_norm: float, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor | None:
        """``torch.nn.utils.clip_grad_norm_`` over all the gradients at once; returns the pre-clip
        norm as a tensor (no host sync); ``max_norm <= 0`` does nothing.

        With a fused ``optimizer`` (``create_optimizer``'s on CPU and CUDA) the scaling is left to
        its next ``step()``, through the ``grad_scale`` it reads for ``GradScaler``: the fused
        kernel divides each gradient as it reads it and stores it back, so after the step the
        gradients are the clipped ones and the optimizer has used them, without a separate pass
        over the gradients (0.6 ms of a 36 ms step on the development machine).
        """
        fused = optimizer is not None and optimizer.defaults.get("fused")
        if fused:
            optimizer.grad_scale = None
        if max_norm <= 0:
            return None
        norm = torch.linalg.vector_norm(self.grad)
        if fused:
            optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
        else:
            self.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as an optimizer over the separate parameters (in
        :func:`parameter_groups` order) gives it: what checkpoints store."""
        flat = optimizer.state_dict()
        state, groups, index = {}, [], 0
        for group, (tensor,), layout in zip(flat["param_groups"], self.groups, self._layout):
            group_state = flat["state"].get(group["params"][0])
            ids = list(range(index, index + len(layout)))
            for pid, (p, offset) in zip(ids, layout):
                if group_state is not None:  # per-element tensors (moments) split; scalars (step) shared
                    state[pid] = {k: _view_like(v, offset, p).clone(memory_format=torch.preserve_format)
                                  if _is_per_element(v, tensor) else v.clone() if torch.is_tensor(v) else v
                                  for k, v in group_state.items()}
            groups.append({**group, "params": ids})
            index += len(layout)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """Load a per-parameter optimizer state (:meth:`optimizer_state_dict`'s form) into ``optimizer``.

        Raises:
            ValueError: the state's groups do not hold as many parameters as the model's.
        """
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(layout) for layout in self._layout]:
            raise ValueError(f"optimizer state does not match the model: {[len(g['params']) for g in groups]} "
                             f"parameters per group, the model has {[len(layout) for layout in self._layout]}")
        state, flat_groups = {}, []
        for i, (group, (tensor,), layout) in enumerate(zip(groups, self.groups, self._layout)):
            members = [state_dict["state"].get(pid) for pid in group["params"]]
            if members and all(m is not None for m in members):
                merged = {}
                for key, value in members[0].items():
                    if all(torch.is_tensor(m[key]) and m[key].dim() > 0 and m[key].shape == p.shape
                           for m, (p, _) in zip(members, layout)):
                        merged[key] = torch.empty_like(tensor)
                        for m, (p, offset) in zip(members, layout):
                            _view_like(merged[key], offset, p).copy_(m[key])
                    else:
                        merged[key] = value
                state[i] = merged
            flat_groups.append({**group, "params": [i]})
        optimizer.load_state_dict({"state": state, "param_groups": flat_groups})


def _is_per_element(value: Any, tensor: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() == tensor.numel()


def _flatten_(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Move ``tensors`` (one dtype and device) into one new 1-D tensor, in order; each keeps its
    values, shape and strides as a view into it (``.data`` rebound). Returns the new tensor."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            view = _view_like(flat, offset, t)
            view.copy_(t)
            t.data = view
            offset += t.numel()
    return flat


class EMA:
    """Exponential moving average of a model's parameters and buffers.

    shadow ← decay·shadow + (1 − decay)·value after each step, for parameters and floating-point
    buffers alike (BatchNorm running statistics must describe the averaged weights, not the live
    ones: copying the live statistics onto averaged weights made validation loss jump between
    epochs); integer buffers (``num_batches_tracked``) are copied. ``module`` is the averaged
    model, used for evaluation and samples.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, flat: FlatParameters | None = None):
        """``flat``: the model's :class:`FlatParameters`; the shadow is then flattened the same way and
        each update is one ``lerp_`` of the two flat tensors (``update`` must get that model)."""
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0
        self._source: torch.Tensor | None = None
        if flat is not None:
            own = dict([*self.module.named_parameters(), *self.module.named_buffers()])
            self._shadow = _flatten_([own[name] for name in flat.names])
            self._source = flat.tensor

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up as in TF's ExponentialMovingAverage: early averages are not dominated by init.
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_f, model_f, ema_i, model_i = [], [], [], []
        if self._source is not None:
            self._shadow.lerp_(self._source, 1.0 - decay)
        else:
            ema_f, model_f = list(self.module.parameters()), list(model.parameters())
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            if not b.is_floating_point():
                ema_i.append(b_ema)
                model_i.append(b)
            elif self._source is None:
                ema_f.append(b_ema)
                model_f.append(b)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        if ema_i:  # _foreach_copy_ rejects an empty list (a model without BatchNorm has no buffers)
            torch._foreach_copy_(ema_i, model_i)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    Args:
        state: plain data (tensors, dicts, lists, numbers, strings); nothing that needs pickling code.
        path: destination file; its folder is created.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, or holds objects that would run
            code when unpickled (refused without running them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train a model first, or check --model_path)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line advises an unsafe reload; name the offending object instead.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: refused: not a plain-data checkpoint ({first[:200]}). "
                              f"Only load checkpoints from sources you trust.") from None
    except Exception as e:  # noqa: BLE001 - the safe unpickler fails in many ways (IndexError, struct.error, ...)
        # on bytes that are not a checkpoint; none of them ran code, all mean the same to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or type(state.get("format")) is not int:
        raise CheckpointError(f"{path}: not a vae checkpoint (no 'format' key); was it written by vae-train?")
    if state["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']} is newer than this code "
                              f"({CHECKPOINT_FORMAT}); upgrade vae-mlops")
    return state


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters that get weight decay (weights: 2-D and up) and those that do not
    (biases and normalisation parameters), each in ``model.parameters()`` order."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def create_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 1e-4,
                     flat: FlatParameters | None = None) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation parameters get no weight decay.

    With ``flat`` (the model's :class:`FlatParameters`), each of the two groups is one tensor.
    """
    groups = flat.groups if flat is not None else parameter_groups(model)
    params = [p for group in groups for p in group]
    # The fused kernel updates each tensor in one pass (foreach: ~10 passes); on a 2-core CPU the
    # step takes about a quarter of the time. Same update rule; other devices keep foreach.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}],
                             lr=learning_rate, **({"fused": True} if fused else {"foreach": True}))


def create_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                        warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: linear warm-up, then cosine decay to 1% / step decay / constant."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if kind == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            return 0.1 ** int(t * 3 - 1e-9) if t > 0 else 1.0  # ×0.1 at 1/3 and 2/3 of training
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the VAE a checkpoint describes and load its weights (EMA weights when present).

    Returns:
        (model in eval mode, checkpoint dict).
    Raises:
        CheckpointError: see :func:`load_checkpoint`; also when the weights do not fit the config.
    """
    from vae.config import ConfigError, validate_config
    from vae.model import VAE

    state = load_checkpoint(path, map_location=device)
    try:
        m = validate_config(state["config"]).model
        model = VAE(**m.as_kwargs())
        ema = state.get("ema_state")
        model.load_state_dict(ema["module"] if use_ema and ema is not None else state["model_state"])
    except (KeyError, TypeError, RuntimeError, ConfigError, AttributeError, ValueError, IndexError) as e:
        detail = " ".join(str(e).split())[:300]  # one line, however long the cause's message
        raise CheckpointError(f"{path}: not a usable VAE checkpoint ({type(e).__name__}: {detail})") from None
    return model.to(device).eval(), state
