"""The embedded default backend: Optuna in this process, one trial at a time.

This wrapper is the one place where a trial's exceptions are caught: Optuna records the trial as FAIL
with the error and the search goes on; a trial told to stop is recorded PRUNED, never COMPLETE; a trial
whose loss diverged is recorded PRUNED with the reason (user attr ``diverged``), so the sampler learns
that region is bad (Optuna's TPE ignores FAIL trials but ranks PRUNED ones); a trial stopped by Ctrl-C /
SIGTERM (or a second Ctrl-C) is recorded FAIL with user attr ``interrupted`` and retried on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft.objectives import EpochReports, study_objectives, trial_values
from autoft.recipe import Recipe
from autoft.space import Space
from autoft.study import Queued, Refill
from autoft.trial import EpochMetrics, Report, TrialOutcome

__all__ = ["Execute", "TrialInterrupted", "optimize"]

log = logging.getLogger(__name__)

# execute(number, params, report) -> outcome: the controller's "run one trial"; knows nothing of Optuna.
Execute = Callable[[int, dict, Report], TrialOutcome]


class TrialInterrupted(Exception):
    """The trial was stopped by a signal before it finished; it is recorded FAIL and retried on resume."""


def _objective(
    space: Space, execute: Execute, study: optuna.Study, finish_allowance: float
) -> Callable[[optuna.Trial], float | list[float]]:
    epochs, names = EpochReports(study, finish_allowance=finish_allowance), study_objectives(study)

    def objective(trial: optuna.Trial) -> float | list[float]:
        params = space.sample(trial)
        # The knobs as the recipe sees them: fixed values and define-by-run names are not in trial.params.
        trial.set_user_attr("knobs", params)
        planned = Recipe.epochs_of(params)

        def report(epoch: int, metrics: EpochMetrics) -> bool:
            left = (planned - epoch - 1) * metrics.seconds
            return epochs.report(trial, epoch, metrics.val_accuracy, seconds_left=left)

        try:
            outcome = execute(trial.number, params, report)
        except Exception as exc:  # recorded in the study; Optuna then marks the trial FAIL and logs the traceback
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: leave at once, but keep the record straight
            trial.set_user_attr("interrupted", True)
            raise
        for key, value in outcome.notes.items():
            trial.set_user_attr(key, value)
        if outcome.interrupted:
            trial.set_user_attr("interrupted", True)
            raise TrialInterrupted(f"stopped by a signal in epoch {len(outcome.history) + 1}")
        trial.set_user_attr("best_epoch", outcome.best_epoch)
        trial.set_user_attr("best_score", outcome.best_score)
        trial.set_user_attr("val_loss", [m.val_loss for m in outcome.history])
        trial.set_user_attr("train_loss", [m.train_loss for m in outcome.history])
        trial.set_user_attr("epoch_seconds", [round(m.seconds, 3) for m in outcome.history])
        if outcome.diverged:
            trial.set_user_attr("diverged", outcome.diverged)
            raise optuna.TrialPruned(f"diverged: {outcome.diverged}")
        if outcome.stopped_early:
            raise optuna.TrialPruned(f"stopped after epoch {len(outcome.history)}")
        return trial_values(names, outcome.best_score, outcome.notes)

    return objective


def optimize(
    study: optuna.Study,
    space: Space,
    execute: Execute,
    *,
    n_trials: int | None,
    timeout: float | None,
    on_trial_end: Callable[[FrozenTrial], None],
    should_stop: Callable[[optuna.Study], bool],
    queue: Sequence[Queued] = (),
    refill: Refill | None = None,
    finish_allowance: float = 0.0,
) -> None:
    """Run up to ``n_trials`` trials in this process, the ``queue`` first; none starts after ``timeout`` seconds.
    The pruner does not stop a trial with at most ``finish_allowance`` seconds left to run.

    When the queue is empty, ``refill(study)`` may queue more (the exploit phase, :mod:`autoft.exploit`) before
    the sampler is asked.

    One trial at a time, each queued trial added to the study just before it runs: a search that stops early
    leaves no WAITING trial. As Optuna's ``study.optimize``, the first trial starts whatever the window.

    >>> optimize(study, load_space("default"), execute, n_trials=10, timeout=None,
    ...          on_trial_end=print, should_stop=lambda s: False)  # doctest: +SKIP
    """
    objective, pending, stopping = _objective(space, execute, study, finish_allowance), list(queue), []
    launch_end = None if timeout is None else time.monotonic() + timeout
    ran = 0

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("interrupted"):
            log.warning("trial %d interrupted: recorded FAIL, it runs again when the search resumes", trial.number)
        elif trial.state == TrialState.FAIL:
            log.warning("trial %d failed: %s", trial.number, trial.user_attrs.get("error", "see the log"))
        elif "diverged" in trial.user_attrs:
            log.warning("trial %d diverged (recorded PRUNED): %s", trial.number, trial.user_attrs["diverged"])
        on_trial_end(trial)
        if should_stop(study):
            stopping.append(True)

    while not stopping and (n_trials is None or ran < n_trials):
        if ran and launch_end is not None and time.monotonic() >= launch_end:
            break
        if not pending and refill is not None:
            pending = list(refill(study))
        if pending:
            pending.pop(0).enqueue(study)
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[callback])
        ran += 1
