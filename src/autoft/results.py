"""Reading a search back out of its Optuna study: the trials table and the ranking of the best trials."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft import objectives
from autoft.objectives import ParetoPoint
from autoft.recipe import describe_knobs

__all__ = ["best_trial", "finished_count", "knobs", "ranked_trials", "trained_trials", "trial_row", "write_trials_csv"]


def knobs(trial: FrozenTrial) -> dict[str, Any]:
    """The recipe knobs a trial trained with (fixed values included); Optuna's own params for older studies."""
    return dict(trial.user_attrs.get("knobs", trial.params))


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as plain data: number, state, value, epochs run, seconds, error, note, parameters."""
    duration = trial.duration.total_seconds() if trial.duration else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.values[0] if trial.values and len(trial.values) == 1 else trial.values,
        "best_epoch": trial.user_attrs.get("best_epoch"),
        # a multi-objective trial keeps its accuracy curve in a user attr (Optuna stores no intermediate values)
        "epochs_run": len(trial.intermediate_values) or len(trial.user_attrs.get("val_accuracy", ())),
        "seconds": round(duration, 2) if duration is not None else None,
        "error": trial.user_attrs.get("error", ""),
        "note": _note(trial.user_attrs),
        **{f"param_{k}": v for k, v in knobs(trial).items()},
    }


def _note(attrs: dict[str, Any]) -> str:
    """What happened to a trial beyond its state: diverged, interrupted, retried after running out of memory."""
    notes = []
    if "diverged" in attrs:
        notes.append(f"diverged: {attrs['diverged']}")
    if attrs.get("unstarted"):
        notes.append("interrupted while its parameters were drawn (nothing ran; not retried)")
    elif attrs.get("interrupted"):
        notes.append("interrupted (its parameters run again on resume)")
    if "warm_start_from" in attrs:
        notes.append(f"seeded by --warm-start from {attrs['warm_start_from']} (not trained here)")
    if "oom_retry_batch_size" in attrs:
        notes.append(f"out of memory: ran at batch size {attrs['oom_retry_batch_size']}")
    if "fitted_steps" in attrs:
        notes.append(f"the search's last trial: {attrs['fitted_steps']} steps fitted to the time left "
                     f"(its knobs: {attrs['planned_steps']})")  # fmt: skip
    if "stopped_by_budget" in attrs:
        notes.append(f"stopped by --timeout after {attrs['stopped_by_budget']}; scored by its best epoch so far")
    return "; ".join(notes)


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Write every trial of the study as one CSV row (parameters a trial did not use are left empty)."""
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def ranked_trials(study: optuna.Study, *, top: int = 5) -> list[dict[str, Any]]:
    """The best COMPLETE trials, best first, each with its strategy in plain words.

    >>> ranked_trials(study, top=3)[0]["strategy"]  # doctest: +SKIP
    'last 2 block groups, adamw lr 3e-04, ...'
    """
    best_first = sorted(trained_trials(study), key=lambda t: (-t.values[0], t.number))[:top]
    return [trial_row(t) | {"strategy": describe_knobs(knobs(t))} for t in best_first]


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished, except those a crash interrupted (they are retried) and
    those ``--warm-start`` seeded (they never ran here)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return sum(1 for t in finished if not t.user_attrs.get("interrupted") and "warm_start_from" not in t.user_attrs)


def trained_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials this study trained, i.e. not seeded by ``--warm-start`` (those have no model)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in complete if "warm_start_from" not in t.user_attrs]


def best_trial(study: optuna.Study, names: tuple[str, ...]) -> tuple[FrozenTrial, list[ParetoPoint]]:
    """The best trial this study trained, and the Pareto front (empty with one objective).

    One objective: the most accurate, the earlier on a tie. Several: the knee of the front of trained trials.
    """
    trained = trained_trials(study)
    if len(names) == 1:
        return max(trained, key=lambda t: (t.values[0], -t.number)), []
    front = objectives.pareto_front([ParetoPoint(t.number, tuple(t.values)) for t in trained], names)
    knee = objectives.knee(front, names).trial
    return next(t for t in trained if t.number == knee), front
