"""Samplers seeded per trial: trial k of a study with ``--seed s`` always draws from seed (s, k).

One seeded sampler per process replays its sequence whenever a process starts again: a rerun
of a sweep re-proposed the first run's settings (trial 2 = trial 0), and two sweep commands
started together on one study drew the same settings. Trial numbers are unique in a study (the
storage assigns them atomically), so seeding each trial's draws by its number makes every trial
draw differently, in any worker, rerun or machine, and keeps a sweep reproducible. TPE, NSGA-II
and random sampling keep no state between trials but their random generator (they read the
history from the study), so a fresh inner sampler per trial changes nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

__all__ = ["TrialSeeded", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """A well-mixed 31-bit seed for trial ``number`` of a sweep seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0] >> 1)


class TrialSeeded(BaseSampler):
    """Delegates to ``make(seed)``, made afresh before each trial with :func:`trial_seed`.

    Args:
        make: builds the inner sampler from a seed (None: unseeded).
        seed: the sweep's seed; None keeps one unseeded inner sampler.
    """

    def __init__(self, make: Callable[[int | None], BaseSampler], seed: int | None):
        self._make, self._seed = make, seed
        self._inner = make(seed)  # replaced before each trial

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._seed is not None:
            self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()

    def __str__(self) -> str:
        return f"TrialSeeded({self._inner})"
