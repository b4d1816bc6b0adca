"""Configuration: presets as plain dicts, validated once into frozen, typed sections.

Users work with flat dicts (``config['num_epochs'] = 100``), as the seed README shows.
``validate_config`` turns such a dict into a :class:`Config` of frozen dataclasses, one per
concern, and rejects unknown keys and bad values with one message naming every bad field.
The dataclass fields below are the single list of keys, defaults and help texts: presets,
validation, the CLI flags (:func:`add_config_arguments`) and MLflow parameter names
(``section.key``) are all generated from them, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from vae import settings
from vae.cli import add_dataclass_arguments
from vae.errors import UserError

__all__ = ["Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "RunConfig", "TrainConfig",
           "PRESETS", "add_config_arguments", "config_from_args", "flatten_params", "get_benchmark_config",
           "get_beta_vae_config", "get_default_config", "get_disentangled_config", "get_small_config",
           "validate_config"]


class ConfigError(UserError, ValueError):
    """A configuration is invalid; the message names every bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")

    def message(self) -> str:
        return "invalid configuration: " + "; ".join(self.problems)


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a help text and range checks (``gt``, ``ge``, ``le``, ``lt``)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = _f(1, "image channels (1 for MNIST)", ge=1)
    hidden_dims: tuple[int, ...] = _f((32, 64, 128, 256), "channels of each stride-2 conv stage", item_ge=1)
    latent_dim: int = _f(128, "dimension of the latent space", ge=1)
    image_size: int = _f(28, "height and width of input and output images", ge=1)
    beta: float = _f(1.0, "KL weight of the plain 'vae' loss", ge=0.0)
    decoder: Literal["conv", "autoregressive"] = _f(
        "conv", "p(x|z): 'conv' (pixels independent given z) or 'autoregressive' (each pixel also given "
                "the pixels before it; needs bce)")
    ar_channels: int = _f(32, "width of the autoregressive decoder head", ge=1)
    ar_kernel: int = _f(7, "odd kernel size of the autoregressive head's causal neighbourhood", ge=3)
    ar_layers: int = _f(1, "depth of the autoregressive head: each layer past 1 adds a causal 3x3 conv", ge=1)
    use_latent: bool = _f(True, "false: the ablation with z removed (the decoder gets z = 0, q(z|x) = p(z), KL = 0)")

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vae.model.VAE`` for this section."""
        return {**dataclasses.asdict(self), "hidden_dims": list(self.hidden_dims)}


@dataclass(frozen=True)
class LossConfig:
    loss_type: Literal["vae", "beta_vae", "disentangled"] = _f("vae", "objective: plain VAE, β-VAE with annealing, β-TC-VAE")
    reconstruction_loss_type: Literal["mse", "bce"] = _f("mse", "reconstruction term: squared error or Bernoulli (BCE)")
    beta_start: float = _f(0.0, "β at step 0 of the linear annealing (beta_vae)", ge=0.0)
    beta_end: float = _f(1.0, "β after beta_steps steps (beta_vae); TC weight (disentangled)", ge=0.0)
    beta_steps: int = _f(1000, "optimizer steps of linear β annealing", ge=0)
    gamma: float = _f(1.0, "dimension-wise KL weight (disentangled)", ge=0.0)
    tc_estimator: Literal["mws", "mss"] = _f("mws", "total-correlation estimator (disentangled)")
    free_bits: float = _f(0.0, "KL nats per latent dimension left unpenalised (vae, beta_vae; 0 = off)", ge=0.0)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _f(128, "images per optimizer step", ge=1)
    num_epochs: int = _f(100, "training epochs", ge=1)
    learning_rate: float = _f(1e-3, "AdamW learning rate", gt=0.0, le=10.0)
    weight_decay: float = _f(1e-4, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 disables)", ge=0.0)
    lr_scheduler: Literal["cosine", "step", "constant"] = _f("cosine", "learning-rate schedule")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps", ge=0)
    ema_decay: float = _f(0.999, "EMA decay of the weights used for evaluation and samples (0 disables)", ge=0.0, lt=1.0)
    val_iw_k: int = _f(0, "importance samples for the validation IW bound each epoch (0 = off)", ge=0)


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["mnist", "fashion_mnist"] = _f("mnist", "dataset")
    data_dir: str = _f("./data", "folder holding <Dataset>/raw IDX files (presets: $VAE_DATA_DIR, else ./data)")
    val_size: int = _f(5000, "training images held out for validation", ge=1)
    binarize: Literal["none", "static", "dynamic"] = _f("none", "binarisation of pixels (likelihood benchmarks)")
    max_train_samples: int = _f(0, "use only the first N training images (0 = all)", ge=0)


@dataclass(frozen=True)
class RunConfig:
    experiment_name: str = _f("vae_mnist", "name of the run folder and MLflow experiment")
    checkpoint_dir: str = _f("checkpoints", "root folder of run folders")
    seed: int = _f(42, "random seed (split, init, shuffling, sampling)", ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = _f("auto", "compute device")
    amp: bool = _f(False, "bf16 autocast on CUDA, or on CPUs with bf16 units (AMX, AVX512-BF16)")
    channels_last: bool = _f(True, "channels-last memory format (faster convolutions on CPU)")
    compile: bool = _f(False, "torch.compile the model")
    fast: bool = _f(True, "the fast path (vae.fast): faster forms of the same layers on CPU float32, and "
                          "retain_memory; off = plain torch.nn layers and glibc's default heap")
    retain_memory: bool = _f(True, "with fast: keep freed memory in the process during training instead of "
                                   "returning it to the OS each step (Linux/glibc; avoids page faults)")
    sample_every: int = _f(5, "write a sample grid every N epochs (0 = never)", ge=0)
    log_every: int = _f(50, "optimizer steps between progress updates (one host sync each)", ge=1)
    progress: bool = _f(True, "show tqdm progress bars")
    fast_dev_run: int = _f(0, "smoke mode: 1 epoch of N batches (0 = off; the trainer applies $VAE_FAST_DEV_RUN)", ge=0)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class Config:
    """A validated configuration. Sections: model, loss, train, data, run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """The flat plain-data dict (lists, not tuples) that ``validate_config`` accepts."""
        return {key: value for _, key, value in _plain_items(self)}

    def replace(self, **overrides: Any) -> "Config":
        """A new validated config with some flat keys changed."""
        return validate_config({**self.to_dict(), **overrides})


# flat key -> (section name, dataclass field)
_FIELDS = {f.name: (sec, f) for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
_HINTS = {sec: typing.get_type_hints(cls) for sec, cls in _SECTIONS.items()}


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def get_default_config() -> dict[str, Any]:
    """The seed's defaults: a plain VAE, hidden 32-64-128-256, latent 128, MSE, 100 epochs.

    ``data_dir`` is where the data lives on this machine: ``$VAE_DATA_DIR`` when set, else
    ``./data`` (:mod:`vae.settings`); every other value is the field's default.
    """
    defaults = {key: _default(f) for key, (_, f) in _FIELDS.items()}
    return {**defaults, "data_dir": settings.current().data_dir or "./data"}


def get_beta_vae_config() -> dict[str, Any]:
    """β-VAE: β annealed linearly from 0 to 4 over the first 2,000 steps."""
    return {**get_default_config(), "experiment_name": "beta_vae", "loss_type": "beta_vae",
            "beta_start": 0.0, "beta_end": 4.0, "beta_steps": 2000}


def get_disentangled_config() -> dict[str, Any]:
    """β-TC-VAE (Chen et al. 2018) with β = 6 on the total correlation, a small latent space."""
    return {**get_default_config(), "experiment_name": "disentangled_vae", "loss_type": "disentangled",
            "latent_dim": 10, "beta_start": 0.0, "beta_end": 6.0, "beta_steps": 2000, "gamma": 1.0,
            "reconstruction_loss_type": "bce"}


def get_benchmark_config() -> dict[str, Any]:
    """Bernoulli decoder on dynamically binarised MNIST: the protocol of the published NLLs.

    Sized for 60 minutes on two CPU cores (``benchmarks/quality.py``): few channels at 28×28 and
    14×14, more at 7×7 and 4×4; a 64-d latent, KL warm-up over ~15% of steps; cosine decay, EMA. The
    decoder is autoregressive: each pixel also given its 7×7 causal neighbourhood, then three causal
    3×3 layers (``ar_layers`` 4; in 30 minutes, 3 layers beat 1 by 0.86 nats: BENCHMARKS.md). Peak
    learning rate 3e-3 (2e-3 before): ahead of 2e-3 in every pair run, 10 to 28 epochs (BENCHMARKS.md).
    """
    return {**get_default_config(), "experiment_name": "benchmark_vae", "reconstruction_loss_type": "bce",
            "binarize": "dynamic", "latent_dim": 64, "hidden_dims": [16, 64, 128], "batch_size": 128,
            "learning_rate": 3e-3, "warmup_steps": 200, "num_epochs": 60, "weight_decay": 0.0,
            "ema_decay": 0.999, "val_size": 1000, "loss_type": "beta_vae", "beta_start": 0.0,
            "beta_end": 1.0, "beta_steps": 4000, "decoder": "autoregressive", "ar_channels": 32, "ar_kernel": 7,
            "ar_layers": 4}


def get_small_config() -> dict[str, Any]:
    """A short run for demos: a smaller net, 3 epochs on a 10k-image subset, the benchmark's
    Bernoulli decoder on dynamically binarised images, so its nats compare with published ones."""
    return {**get_default_config(), "experiment_name": "vae_demo", "hidden_dims": [16, 32, 64], "latent_dim": 16,
            "num_epochs": 3, "max_train_samples": 10000, "batch_size": 128, "sample_every": 1, "val_size": 1000,
            "reconstruction_loss_type": "bce", "binarize": "dynamic", "learning_rate": 5e-3}


def _check_type(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """(ok, coerced value, expected-type words) for one field."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return value in choices, value, "one of " + ", ".join(repr(c) for c in choices)
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
            return True, tuple(value), ""
        return False, value, "a list of integers"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return type(value) is int, value, "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            return ok, float(value) if ok else value, "a number"
        except OverflowError:  # an int beyond float range
            return False, value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    raise TypeError(f"unsupported config type {hint!r}")  # pragma: no cover - a bug in this module


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> list[str]:
    problems = []
    bounds = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
              "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}
    for name, (ok, sym) in bounds.items():
        if name in meta and not ok(value, meta[name]):
            problems.append(f"{key}: must be {sym} {meta[name]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) and not problems:
        problems.append(f"{key}: must be a finite number, got {value!r}")
    if "item_ge" in meta:
        if len(value) == 0:
            problems.append(f"{key}: must not be empty")
        bad = [v for v in value if v < meta["item_ge"]]
        if bad:
            problems.append(f"{key}: every entry must be >= {meta['item_ge']}, got {list(value)!r}")
    return problems


def _cross_checks(c: Config) -> list[str]:
    problems = []
    if c.data.dataset in ("mnist", "fashion_mnist"):
        if c.model.image_size != 28:
            problems.append(f"image_size: {c.data.dataset} images are 28x28, got {c.model.image_size}")
        if c.model.in_channels != 1:
            problems.append(f"in_channels: {c.data.dataset} images have 1 channel, got {c.model.in_channels}")
    if c.loss.loss_type == "disentangled" and c.loss.free_bits:
        problems.append("free_bits: applies to the 'vae' and 'beta_vae' losses, not 'disentangled' (set it to 0)")
    if c.loss.loss_type == "disentangled" and c.train.batch_size < 2:
        problems.append("batch_size: the disentangled loss estimates q(z) from the batch and needs >= 2")
    if 2 ** (len(c.model.hidden_dims) - 1) > c.model.image_size:
        problems.append(f"hidden_dims: {len(c.model.hidden_dims)} stride-2 stages need images of at least "
                        f"{2 ** (len(c.model.hidden_dims) - 1)} pixels, got image_size {c.model.image_size}")
    if c.model.decoder == "autoregressive":
        if c.loss.reconstruction_loss_type != "bce":
            problems.append("decoder: 'autoregressive' models Bernoulli pixels; set reconstruction_loss_type "
                            "to 'bce' (and binarize to 'dynamic' for likelihood benchmarks)")
        if c.model.ar_kernel % 2 == 0:
            problems.append(f"ar_kernel: must be odd (the causal mask is centred), got {c.model.ar_kernel}")
    if c.data.max_train_samples and c.data.max_train_samples <= c.data.val_size:
        problems.append(f"max_train_samples: must exceed val_size ({c.data.val_size}) so training "
                        f"images remain, got {c.data.max_train_samples}")
    return problems


def validate_config(raw: Mapping[str, Any] | Config) -> Config:
    """Validate a flat config dict into a frozen :class:`Config`.

    Args:
        raw: flat mapping of keys to values; missing keys take their defaults.
    Returns:
        The typed, frozen configuration.
    Raises:
        ConfigError: naming every unknown key, wrong type and out-of-range value at once.
    """
    if isinstance(raw, Config):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError([f"configuration must be a mapping of keys to values, got {type(raw).__name__}"])
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {sec: {} for sec in _SECTIONS}
    for key, value in raw.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        sec, f = _FIELDS[key]
        ok, coerced, expected = _check_type(value, _HINTS[sec][key])
        if not ok:
            problems.append(f"{key}: must be {expected}, got {value!r}")
            continue
        range_problems = _check_range(key, coerced, f.metadata)
        problems.extend(range_problems)
        if not range_problems:
            values[sec][key] = coerced
    # Cross-field checks run even when some fields are bad (those take their defaults here), so
    # every bad field is named at once; a cross problem that mentions a bad field is left out.
    cfg = Config(**{sec: cls(**values[sec]) for sec, cls in _SECTIONS.items()})
    bad = [re.compile(rf"\b{re.escape(str(p.split(':', 1)[0]))}\b") for p in problems]
    problems += [c for c in _cross_checks(cfg) if not any(b.search(c) for b in bad)]
    if problems:
        raise ConfigError(problems)
    return cfg


def flatten_params(cfg: Config) -> dict[str, Any]:
    """``{'model.latent_dim': 128, 'loss.beta_end': 1.0, ...}``: stable names for trackers."""
    return {f"{section}.{key}": value for section, key, value in _plain_items(cfg)}


def _plain_items(cfg: Config) -> list[tuple[str, str, Any]]:
    """(section, key, value as plain data: lists, not tuples) of every field of ``cfg``."""
    return [(sec, k, list(v) if isinstance(v, tuple) else v)
            for sec in _SECTIONS for k, v in dataclasses.asdict(getattr(cfg, sec)).items()]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--key`` flag per config field (default: unset, so presets decide). Values that do
    not convert are kept as text: :func:`validate_config` then names every bad flag at once."""
    for sec, cls in _SECTIONS.items():
        add_dataclass_arguments(parser.add_argument_group(f"{sec} options"), cls, lenient=True)
    return parser


def config_from_args(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> Config:
    """Apply the flags that were given over ``base`` (default preset) and validate."""
    cfg = dict(base if base is not None else get_default_config())
    for key in _FIELDS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    return validate_config(cfg)


PRESETS = {"default": get_default_config, "beta_vae": get_beta_vae_config, "disentangled": get_disentangled_config,
           "benchmark": get_benchmark_config, "small": get_small_config}
