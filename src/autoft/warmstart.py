"""``--warm-start RUN_DIR``: seed a new study with the finished trials of an earlier search on similar data.

The earlier COMPLETE trials are added to the new study as they were (parameters, scores, accuracy curve),
marked with the user attr ``warm_start_from``, so the sampler starts informed without training them again.
Only scores are reused, never models: a seeded trial has no model on disk and is never exported as ``best/``.
A trial is seeded only if the current space, replayed with its values, asks for nothing it lacks, accepts
every value (range, step, choices) and gives the same knobs (fixed values included); the rest are skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from autoft import results
from autoft.errors import AutoftError
from autoft.objectives import study_objectives
from autoft.space import Space

__all__ = ["load_earlier_study", "seed_study"]

log = logging.getLogger(__name__)


class _Misfit(Exception):
    """The earlier trial's values do not fit the current space."""


class _Replay:
    """A stand-in for ``optuna.Trial`` that answers each suggestion with the earlier trial's value, if it fits."""

    def __init__(self, params: dict[str, Any]):
        self.params, self.distributions = params, {}

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False):
        return self._take(name, FloatDistribution(low, high, log=log, step=step))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._take(name, IntDistribution(low, high, log=log, step=step))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._take(name, CategoricalDistribution(choices))

    def _take(self, name: str, distribution: BaseDistribution) -> Any:
        if name not in self.params:
            raise _Misfit(f"it has no value for {name}")
        value = self.params[name]
        try:
            fits = distribution._contains(distribution.to_internal_repr(value))
        except (TypeError, ValueError):
            fits = False
        if not fits:
            raise _Misfit(f"{name}={value!r} is outside {distribution}")
        self.distributions[name] = distribution
        return value


def load_earlier_study(run_dir: Path) -> optuna.Study:
    """The study of an earlier run folder (its config.yaml names storage and study; else its study.db)."""
    if not run_dir.is_dir():
        raise AutoftError(f"--warm-start {run_dir} does not exist; give the run folder of an earlier autoft search.")
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
        storage, name = config.get("storage"), config.get("study_name")
    else:
        storage, name = None, None
    if storage is None:
        if not (run_dir / "study.db").is_file():
            raise AutoftError(
                f"--warm-start {run_dir} holds no study (no config.yaml or study.db); "
                "give the run folder of an earlier autoft search."
            )
        storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except (KeyError, ValueError) as exc:
        raise AutoftError(f"--warm-start {run_dir}: cannot open its study in {storage} ({exc}).") from None


def _seed_trial(trial: FrozenTrial, space: Space, source: Path) -> FrozenTrial:
    """The earlier trial as a new COMPLETE trial of the current space (raises :class:`_Misfit` if it does not fit)."""
    earlier = results.knobs(trial)
    replay = _Replay(earlier | trial.params)
    knobs = space.sample(replay)
    changed = [k for k, v in knobs.items() if earlier.get(k, v) != v]
    if changed:
        raise _Misfit(f"the space now fixes {', '.join(f'{k}={knobs[k]!r}' for k in changed)}")
    attrs = dict(trial.user_attrs) | {"knobs": knobs, "warm_start_from": f"{source}#trial-{trial.number}"}
    return optuna.trial.create_trial(
        params={k: replay.params[k] for k in replay.distributions},
        distributions=replay.distributions,
        values=trial.values,
        intermediate_values=dict(trial.intermediate_values),
        user_attrs=attrs,
    )


def seed_study(study: optuna.Study, space: Space, run_dir: Path) -> int:
    """Add the earlier run's COMPLETE trials that fit ``space`` to ``study``; returns how many were added.

    >>> seed_study(study, load_space("default"), Path("runs/resnet50-cats"))  # doctest: +SKIP
    12
    """
    earlier = load_earlier_study(run_dir)
    ours, theirs = study_objectives(study), study_objectives(earlier)
    if ours != theirs:
        raise AutoftError(
            f"--warm-start {run_dir} optimized {','.join(theirs)} but this search optimizes {','.join(ours)}; "
            f"use the same --objective or start without --warm-start."
        )
    complete = earlier.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise AutoftError(f"--warm-start {run_dir} has no COMPLETE trial to learn from; let that search finish first.")
    seeded, skipped = [], []
    for trial in complete:
        try:
            seeded.append(_seed_trial(trial, space, run_dir))
        except _Misfit as why:
            skipped.append(f"trial {trial.number} ({why})")
    study.add_trials(seeded)
    log.info("warm start: %d trial(s) of %s seeded, %d skipped", len(seeded), run_dir, len(skipped))
    if skipped:
        log.warning("warm start: %d earlier trial(s) do not fit this space: %s", len(skipped), "; ".join(skipped))
    return len(seeded)
