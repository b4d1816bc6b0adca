"""How many trials a sweep still runs: ``--n-trials N`` means N finished trials in the study.

Finished means complete or pruned; failed trials do not count (a trial failed by its stale
heartbeat is queued again and its retry counts when it finishes). Rerunning a finished sweep adds
nothing; rerunning an interrupted one finishes it. Workers (processes of one sweep, or sweeps on
other machines) share the count through the study itself: before each trial a worker counts the
finished trials and those running elsewhere, and starts one only if the total still needs it.
When only running trials stand between the study and N, it waits for them: they finish, or their
worker died and their heartbeat goes stale, the trial is failed and queued, and this worker runs it.
"""

from __future__ import annotations

import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["FINISHED", "StopAtTotal", "needed", "fail_stale"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat went stale (their workers died) and queue them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def needed(study: optuna.Study, n_total: int, poll_s: float = 1.0, say=print, heartbeat: bool = True) -> int:
    """Trials this worker should still start so the study reaches ``n_total`` finished ones.

    Waits (polling every ``poll_s``) while the trials running elsewhere would make up the total.
    Without heartbeats (a journal storage) a dead worker's trial would stay RUNNING for ever, so
    running trials are not counted (workers of one journal study may then overshoot N a little).
    """
    said = False
    while True:
        fail_stale(study)
        trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        finished = sum(t.state in FINISHED for t in trials)
        running = len(trials) - finished if heartbeat else 0
        if finished >= n_total:
            return 0
        if n_total - finished > running:
            return n_total - finished - running
        if not said:
            say(f"{finished} of {n_total} trials finished, {running} running elsewhere: waiting for them "
                f"(a dead worker's trial is retried once its heartbeat is stale)")
            said = True
        time.sleep(poll_s)


class StopAtTotal:
    """Study callback: stop when the study needs no more trials from this worker.

    Also stops after ``max_failures`` failed trials of this worker, so a sweep whose every trial
    fails ends (as many attempts as trials were needed) instead of trying for ever, and after
    ``cap`` finished trials of this worker (its share), when given.
    """

    def __init__(self, n_total: int, max_failures: int, poll_s: float = 1.0, say=print, heartbeat: bool = True,
                 cap: int | None = None):
        self.n_total, self.max_failures, self.poll_s, self.say = n_total, max(1, max_failures), poll_s, say
        self.heartbeat, self.cap, self.failures, self.finished = heartbeat, cap, 0, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failures += trial.state == TrialState.FAIL
        self.finished += trial.state in FINISHED
        if self.failures >= self.max_failures or (self.cap is not None and self.finished >= self.cap):
            study.stop()
        elif needed(study, self.n_total, self.poll_s, self.say, self.heartbeat) == 0:
            study.stop()
