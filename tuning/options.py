"""A sweep's options, built and checked once at the edge (CLI or flow) before any work starts.

:func:`make_options` takes the plain values the command line and the Prefect flow share and
returns a frozen :class:`SweepOptions`, or raises :class:`SweepError` with one line for the user:
unknown or badly typed fixed keys, bad ranges, a storage URL that cannot be parsed, options that
do not go together. Options travel to worker processes as JSON (:meth:`SweepOptions.to_json`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from vae import settings
from vae.config import PRESETS
from tuning.space import (DEFAULT_BETA_RANGE, DEFAULT_LATENT_DIMS, DEFAULT_LR_RANGE, ParamSpec, SpaceError,
                          check_space, default_space, parse_spec)

__all__ = ["SweepError", "SweepOptions", "make_options", "optuna_dir", "default_storage", "redact"]

SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("nelbo", "iw")
# Sweep defaults under the preset: no sample grids or progress bars per trial.
SWEEP_FIXED_DEFAULTS = {"sample_every": 0, "progress": False}
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SweepError(SpaceError):
    """Bad sweep options; the message is one line, printed by the CLI before exit code 2."""


@dataclass(frozen=True)
class SweepOptions:
    """Everything a sweep (and each of its workers) needs; see ``python -m tuning --help``."""

    study_name: str = "vae-sweep"
    storage: str = ""  # resolved URL; "" never leaves make_options
    n_trials: int = 20
    timeout: float | None = None
    n_workers: int = 1
    seed: int | None = 0
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 0
    objective: Literal["nelbo", "iw"] = "nelbo"
    iw_k: int = 5
    multi_objective: bool = False
    population_size: int = 20
    space: Mapping[str, ParamSpec] = field(default_factory=dict)
    base_config: Mapping[str, Any] = field(default_factory=dict)  # preset + sweep defaults + fixed
    experiment_name: str = ""  # MLflow experiment; default: the study name
    threads: int | None = None  # torch threads per worker process
    trials_dir: str = ""  # trial run folders (checkpoints) go under here
    plots: bool = True  # draw the study's figures at the end

    @property
    def metric(self) -> str:
        """The trainer's metric key that single-objective trials minimise and report each epoch."""
        return f"val/iw_nll_k{self.iw_k}" if self.objective == "iw" else "val/nelbo"

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("val/recon", "val/kl") if self.multi_objective else (self.metric,)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["space"] = {k: dataclasses.asdict(v) for k, v in self.space.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "SweepOptions":
        data = json.loads(text)
        data["space"] = {k: ParamSpec(**{**v, "choices": tuple(v["choices"])}) for k, v in data["space"].items()}
        return cls(**data)


def optuna_dir() -> Path:
    """Where studies and best configs live: ``$VAE_OPTUNA_DIR`` or ``./optuna``."""
    return settings.current().optuna_dir


def default_storage() -> str:
    """``$VAE_OPTUNA_STORAGE`` (a shared study store, e.g. PostgreSQL: see scripts/stack.sh), else
    the embedded default ``sqlite:///<optuna_dir>/studies.db``."""
    return settings.current().optuna_storage or f"sqlite:///{optuna_dir() / 'studies.db'}"


def redact(url: str) -> str:
    """A storage URL with its password hidden, for logs and MLflow tags."""
    if url.startswith("journal:"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def make_options(*, study_name: str = "vae-sweep", storage: str | None = None, n_trials: int = 20,
                 timeout: float | None = None, n_workers: int = 1, seed: int | None = 0, sampler: str | None = None,
                 pruner: str | None = None, pruner_startup_trials: int = 5, pruner_warmup_epochs: int = 0,
                 objective: str = "nelbo", iw_k: int = 5, multi_objective: bool = False, population_size: int = 20,
                 preset: str = "small", beta_range=None, latent_dims=None, lr_range=None,
                 search: Mapping[str, str] | None = None, fixed: Mapping[str, Any] | None = None,
                 experiment_name: str | None = None, threads: int | None = None, plots: bool = True) -> SweepOptions:
    """Build and check a sweep's options. Raises :class:`SweepError` (one line) on bad input."""
    fixed, search = dict(fixed or {}), dict(search or {})
    _check_choice("preset", preset, PRESETS)
    _check_choice("objective", objective, OBJECTIVES)
    sampler = sampler or ("nsga2" if multi_objective else "tpe")
    _check_choice("sampler", sampler, SAMPLERS)
    if multi_objective and pruner not in (None, "none"):
        raise SweepError(f"--pruner {pruner}: Optuna cannot prune multi-objective studies; drop --pruner")
    pruner = pruner or ("none" if multi_objective else "median")
    _check_choice("pruner", pruner, PRUNERS)
    if not _STUDY_NAME.match(study_name or ""):
        raise SweepError(f"study name {study_name!r}: use letters, digits, '_', '.', '-' (at most 100)")
    for name, value, low in (("n-trials", n_trials, 1), ("n-workers", n_workers, 1), ("iw-k", iw_k, 1),
                             ("population-size", population_size, 2), ("pruner-startup-trials", pruner_startup_trials, 0),
                             ("pruner-warmup-epochs", pruner_warmup_epochs, 0)):
        if type(value) is not int or value < low:
            raise SweepError(f"--{name}: must be an integer >= {low}, got {value!r}")
    if n_workers > n_trials:
        raise SweepError(f"--n-workers {n_workers}: more workers than trials ({n_trials})")
    if timeout is not None and not timeout > 0:
        raise SweepError(f"--timeout: must be > 0 seconds, got {timeout!r}")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise SweepError(f"--threads: must be an integer >= 1, got {threads!r}")

    base = {**PRESETS[preset](), **SWEEP_FIXED_DEFAULTS, **fixed}
    if objective == "iw":
        base["val_iw_k"] = iw_k
    space = _build_space(base, beta_range, latent_dims, lr_range, search, fixed)
    check_space(space, base)
    return SweepOptions(
        study_name=study_name, storage=_check_storage(storage or default_storage(), n_workers),
        n_trials=n_trials, timeout=timeout, n_workers=n_workers, seed=seed, sampler=sampler, pruner=pruner,
        pruner_startup_trials=pruner_startup_trials, pruner_warmup_epochs=pruner_warmup_epochs,
        objective=objective, iw_k=iw_k, multi_objective=multi_objective, population_size=population_size,
        space=space, base_config=base, experiment_name=experiment_name or study_name, threads=threads,
        trials_dir=str(optuna_dir() / study_name / "trials"), plots=bool(plots))


def _build_space(base, beta_range, latent_dims, lr_range, search, fixed) -> dict[str, ParamSpec]:
    loss_type = base.get("loss_type", "vae")
    space = default_space(loss_type, beta_range or DEFAULT_BETA_RANGE, latent_dims or DEFAULT_LATENT_DIMS,
                          lr_range or DEFAULT_LR_RANGE)
    explicit = {k for k, given in zip(space, (beta_range, latent_dims, lr_range)) if given is not None}
    for key in fixed:  # a fixed key leaves the default space, but not a range asked for explicitly
        if key in explicit or key in search:
            raise SweepError(f"{key}: both fixed (--set) and searched; choose one")
        space.pop(key, None)
    for key, spec in search.items():
        space[key] = parse_spec(key, spec)
    return space


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise SweepError(f"--{name} {value!r}: choose one of {', '.join(sorted(choices))}")


def _check_storage(url: str, n_workers: int) -> str:
    """Parse (not open) a storage URL: ``journal:PATH`` or any SQLAlchemy URL with its driver."""
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if not path:
            raise SweepError("--storage journal:PATH: the journal file path is missing")
        return f"journal:{Path(path).resolve()}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:  # a subclass of ArgumentError: first
        raise SweepError(f"--storage {redact(url)}: unknown database driver {parsed.drivername!r}") from None
    except ArgumentError:
        raise SweepError(f"--storage {url!r}: not a database URL (e.g. sqlite:///optuna/studies.db, "
                         f"postgresql+psycopg://user@host/db, journal:optuna/studies.log)") from None
    except ImportError as e:
        raise SweepError(f"--storage {redact(url)}: its driver is not installed ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SweepError("--storage: an in-memory SQLite study cannot be resumed or shared; give a file")
        return f"sqlite:///{Path(parsed.database).resolve()}"
    return url
