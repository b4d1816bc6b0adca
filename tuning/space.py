"""The search space: which config keys a sweep varies, over which ranges, and how it is checked.

A space maps config keys (the flat keys of :mod:`vae.config`) to :class:`ParamSpec`. Optuna's
parameter names are the config keys themselves, so a trial's ``params`` drop straight into a
config dict. The default space is the issue's: β log-uniform 0.1–10, latent dimension in
{8, 16, 32, 64, 128}, learning rate log-uniform 1e-4–3e-3. β is the config key ``beta`` for the
plain VAE loss and ``beta_end`` (the annealing target) for the β-VAE and β-TC-VAE losses.

Extra parameters use a small grammar (``--search KEY=SPEC``)::

    log:LO:HI       float, log-uniform        float:LO:HI   float, uniform
    int:LO:HI       integer, uniform          choice:A|B|C  categorical (each value JSON)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from vae.config import ConfigError, validate_config
from vae.errors import UserError

__all__ = ["ParamSpec", "SpaceError", "beta_key", "check_space", "default_space", "parse_spec", "suggest"]

DEFAULT_BETA_RANGE = (0.1, 10.0)
DEFAULT_LATENT_DIMS = (8, 16, 32, 64, 128)
DEFAULT_LR_RANGE = (1e-4, 3e-3)


class SpaceError(UserError, ValueError):
    """A search space or fixed parameter is invalid; the message is one line for the user."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a float or int range (optionally log-scaled) or a set of choices."""

    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    encoded: bool = False  # choices are lists stored as JSON text (Optuna takes only scalars)

    def decode(self, value: Any) -> Any:
        """A sampled value as the config wants it (JSON text back to a list)."""
        return json.loads(value) if self.encoded else value

    def extremes(self) -> list[Any]:
        """The values whose validity bounds every value the sampler can draw."""
        if self.kind == "categorical":
            return [self.decode(c) for c in self.choices]
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "choice:" + "|".join(c if self.encoded else json.dumps(c) for c in self.choices)
        return f"{'log' if self.log else self.kind}:{self.low:g}:{self.high:g}"


def beta_key(loss_type: str) -> str:
    """The config key that β means for a loss: ``beta`` (plain VAE) or ``beta_end`` (annealed)."""
    return "beta" if loss_type == "vae" else "beta_end"


def default_space(loss_type: str = "vae", beta_range=DEFAULT_BETA_RANGE, latent_dims=DEFAULT_LATENT_DIMS,
                  lr_range=DEFAULT_LR_RANGE) -> dict[str, ParamSpec]:
    """The issue's space, with any of its three ranges replaced."""
    return {
        beta_key(loss_type): _range("float", beta_range, log=True, name="beta range"),
        "latent_dim": _categorical(latent_dims, "latent dims"),
        "learning_rate": _range("float", lr_range, log=True, name="lr range"),
    }


def parse_spec(key: str, text: str) -> ParamSpec:
    """``log:1e-5:1e-3`` -> ParamSpec (see the module docstring for the grammar)."""
    kind, _, rest = str(text).partition(":")
    if kind == "choice":
        try:
            values = [json.loads(v) for v in rest.split("|")] if rest else []
        except json.JSONDecodeError as e:
            raise SpaceError(f"search {key}: choices must be JSON values separated by '|', got {rest!r} ({e.msg})")
        return _categorical(values, f"search {key}")
    if kind in ("log", "float", "int"):
        parts = rest.split(":")
        if len(parts) != 2:
            raise SpaceError(f"search {key}: expected {kind}:LOW:HIGH, got {text!r}")
        try:
            bounds = [float(p) for p in parts]
        except ValueError:
            raise SpaceError(f"search {key}: bounds must be numbers, got {text!r}") from None
        return _range("int" if kind == "int" else "float", bounds, log=kind == "log", name=f"search {key}")
    raise SpaceError(f"search {key}: spec must start with log:, float:, int: or choice:, got {text!r}")


def check_space(space: Mapping[str, ParamSpec], base: Mapping[str, Any]) -> None:
    """Check every extreme of every parameter against :func:`vae.config.validate_config`.

    Raises:
        SpaceError: naming the first parameter whose range leaves the valid configs.
    """
    if not space:
        raise SpaceError("the search space is empty: search at least one parameter")
    try:
        validate_config(base)
    except ConfigError as e:
        raise SpaceError("fixed parameters: " + "; ".join(e.problems)) from None
    for key, spec in space.items():
        for value in spec.extremes():
            try:
                validate_config({**base, key: value})
            except ConfigError as e:
                raise SpaceError(f"search {key}={spec.describe()}: " + "; ".join(e.problems)) from None


def suggest(trial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Draw one value per parameter from an Optuna trial; returns ``{config key: value}``."""
    out = {}
    for key, spec in space.items():
        if spec.kind == "categorical":
            out[key] = spec.decode(trial.suggest_categorical(key, list(spec.choices)))
        elif spec.kind == "int":
            out[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return out


def _range(kind: str, bounds, *, log: bool, name: str) -> ParamSpec:
    bounds = list(bounds)
    if len(bounds) != 2:
        raise SpaceError(f"{name}: expected two numbers LOW HIGH, got {bounds!r}")
    low, high = (float(b) for b in bounds)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{name}: need finite LOW < HIGH, got {low:g} {high:g}")
    if log and low <= 0:
        raise SpaceError(f"{name}: a log-uniform range needs LOW > 0, got {low:g}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SpaceError(f"{name}: integer bounds expected, got {low:g} {high:g}")
    return ParamSpec(kind, low=low, high=high, log=log)


def _categorical(values, name: str) -> ParamSpec:
    values = list(values)
    if not values:
        raise SpaceError(f"{name}: give at least one value")
    if len({json.dumps(v) for v in values}) != len(values):
        raise SpaceError(f"{name}: duplicate values in {values!r}")
    # Optuna's categorical values must be None, bool, int, float or str: lists travel as JSON text.
    encoded = any(isinstance(v, (list, tuple)) for v in values)
    choices = tuple(json.dumps(list(v) if isinstance(v, (list, tuple)) else v) if encoded else v for v in values)
    return ParamSpec("categorical", choices=choices, encoded=encoded)
