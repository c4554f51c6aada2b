"""The study: the one record of a search. Open or continue it, build its sampler and pruner, recover trials
a crash interrupted, and read what went wrong when trials keep failing.

Running the same command again continues the same study (``load_if_exists``); the sampler and pruner are
rebuilt from the configuration each time (Optuna does not store them).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft import objectives
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.preload import preload
from autoft.recipe import Recipe

__all__ = [
    "Queued",
    "Refill",
    "create_pruner",
    "create_sampler",
    "in_lp_ft_dip",
    "no_complete_trial_error",
    "open_study",
    "portfolio_left",
    "recover_interrupted",
    "systematic_error",
]

log = logging.getLogger(__name__)


# What Optuna imports when it makes its first database storage (lazily, inside RDBStorage): SQLAlchemy and alembic
# took 1.2 s of the demo's 30 s budget on 2 cores (py-spy, 2026-12-04), in series with everything else.
STORAGE_MODULES = (
    "sqlalchemy", "sqlalchemy.orm", "sqlalchemy.dialects.sqlite", "optuna.storages._rdb.models",
    "alembic.command", "alembic.config", "alembic.migration", "alembic.script",
)  # fmt: skip


def preload_storage(config: SearchConfig) -> threading.Thread | None:
    """Import what a database storage needs in a background thread (:func:`autoft.preload.preload`), so that
    loading them overlaps the model's and the data's preparation (mostly C that releases the GIL) instead of
    following it. None for a storage that is no database.
    """
    if not str(config.storage).startswith(("sqlite", "mysql", "postgresql")):
        return None
    return preload(STORAGE_MODULES, name="autoft-preload-storage")


def open_study(config: SearchConfig) -> optuna.Study:
    """Create the study in its storage, or load it to continue: running the same command again resumes.

    It opens without a pruner: the plan, made after the study is open (it reads the study's stored probe),
    decides the pruner and the trials' length, and the controller sets ``study.pruner`` from it once.
    """
    study = optuna.create_study(
        storage=config.storage,
        study_name=config.study_name,
        sampler=create_sampler(config.sampler, seed=config.seed, trials=config.trials),
        pruner=optuna.pruners.NopPruner(),
        directions=objectives.directions(config.objectives),
        load_if_exists=True,
    )
    if not study.trials and "objectives" not in study.user_attrs:
        study.set_user_attr("objectives", list(config.objectives))
    if objectives.study_objectives(study) != config.objectives:
        raise AutoftError(
            f"Study {config.study_name!r} was run with --objective {','.join(objectives.study_objectives(study))}, "
            f"not {','.join(config.objectives)}; use that --objective to continue it, or a new --study-name."
        )
    if len(config.objectives) > 1:
        log.info("several objectives: --pruner %s judges the accuracy curves (Optuna cannot prune them)", config.pruner)
    return study


def create_sampler(name: str, *, seed: int, trials: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``--sampler``, seeded; model-based ones start after a few random trials.

    Conditional knobs (``when``) give a dynamic space: TPE handles it (``group=True``); GP, CMA-ES and QMC
    model the knobs every trial shares and sample the rest independently (their warning about it is silenced).
    The model-based ones learn without the trials the ``--timeout`` deadline cut short (:class:`_WithoutBudgetCuts`).

    >>> type(create_sampler("qmc", seed=0, trials=20)).__name__
    'QMCSampler'
    """
    n_startup = max(3, min(10, (trials or 20) // 4))
    factories: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: _TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, group=True),
        # GP (scipy + torch): sample-efficient for small budgets of expensive trials.
        "gp": lambda: _GPSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False),
        # CMA-ES (the `cmaes` package): continuous knobs only; categorical ones go to the independent sampler.
        "cmaes": lambda: _CmaEsSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(
            seed=seed, scramble=True, warn_independent_sampling=False, warn_asynchronous_seeding=False
        ),
    }
    if name not in factories:
        raise AutoftError(f"--sampler {name!r} is not known; choose one of: {', '.join(factories)}.")
    with warnings.catch_warnings():  # `group`, GPSampler and QMC options are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return factories[name]()


class _WithoutBudgetCuts:
    """The study as a sampler should learn from it: without the trials the ``--timeout`` deadline ended early.

    Such a trial stays COMPLETE with its best epoch so far (its model is real and may be the best one), but its
    score is that of a shorter trial than its knobs say: a sampler that learned from it would think its long
    recipe weak. The search's last trial, its steps fitted to the time left (:mod:`autoft.stretch`), is left out
    for the same reason. Everything else is the study itself.
    """

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if not {"stopped_by_budget", "fitted_steps"} & t.user_attrs.keys()]

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class _LearnsWithoutBudgetCuts:
    """Mixed into the model-based samplers (as a subclass: Optuna's own checks of the sampler's type still hold)."""

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return super().infer_relative_search_space(_WithoutBudgetCuts(study), trial)  # type: ignore[misc]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return super().sample_relative(_WithoutBudgetCuts(study), trial, search_space)  # type: ignore[misc]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any) -> Any:
        return super().sample_independent(_WithoutBudgetCuts(study), trial, name, distribution)  # type: ignore[misc]


class _TPESampler(_LearnsWithoutBudgetCuts, optuna.samplers.TPESampler):
    pass


class _GPSampler(_LearnsWithoutBudgetCuts, optuna.samplers.GPSampler):
    pass


class _CmaEsSampler(_LearnsWithoutBudgetCuts, optuna.samplers.CmaEsSampler):
    pass


def create_pruner(name: str, *, max_epochs: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner for ``--pruner``, set for one report per epoch (step = epoch index), knowing LP-FT.

    Median: judge a trial only after its first epoch, once 3 trials have finished. Hyperband / SHA: rungs at
    1, 3, 9, ... epochs (reduction factor 3) up to ``max_epochs``. Wilcoxon: compares the trial's epoch curve
    with the best trial's, from the second epoch on. None of them stops an LP-FT trial before it has trained
    one epoch past its unfreezing (:func:`in_lp_ft_dip`).

    >>> isinstance(create_pruner("hyperband", max_epochs=9), optuna.pruners.HyperbandPruner)
    True
    """
    factories: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: _MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        "hyperband": lambda: _HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3),
        "sha": lambda: _SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "wilcoxon": lambda: _WilcoxonPruner(p_threshold=0.1, n_startup_steps=2),
        "none": optuna.pruners.NopPruner,
    }
    if name not in factories:
        raise AutoftError(f"--pruner {name!r} is not known; choose one of: {', '.join(factories)}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return factories[name]()


# A backend's source of more queued trials once its queue is empty (the exploit phase); [] lets the sampler ask.
Refill = Callable[[optuna.Study], Sequence["Queued"]]


def in_lp_ft_dip(trial: FrozenTrial) -> bool:
    """Whether an LP-FT trial's last report is from its head-only epochs, the first epoch after everything
    unfroze, or the one after: its accuracy dips when the body starts moving (Kumar et al. 2022), and a
    pruner comparing it with trials that trained everything from the start would stop it at that dip (the
    issue's measurement: LP-FT pruned at its unfreezing point on every search).

    >>> in_lp_ft_dip(optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"knobs": {"freeze": "lp_ft"}},
    ...     intermediate_values={0: 0.5, 1: 0.3}))
    True
    """
    knobs = trial.user_attrs.get("knobs", trial.params)
    if knobs.get("freeze") != "lp_ft" or trial.last_step is None:
        return False
    lp_epochs = knobs.get("lp_epochs", Recipe.__dataclass_fields__["lp_epochs"].default)
    return trial.last_step <= lp_epochs + 1  # steps are epoch indices: lp_epochs is the first joint epoch


class _KeepsLpFt:
    """Mixed into each Optuna pruner (as a subclass, so Optuna's own isinstance checks still hold)."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return False if in_lp_ft_dip(trial) else super().prune(study, trial)  # type: ignore[misc]


class _MedianPruner(_KeepsLpFt, optuna.pruners.MedianPruner):
    pass


class _HyperbandPruner(_KeepsLpFt, optuna.pruners.HyperbandPruner):
    pass


class _SuccessiveHalvingPruner(_KeepsLpFt, optuna.pruners.SuccessiveHalvingPruner):
    pass


class _WilcoxonPruner(_KeepsLpFt, optuna.pruners.WilcoxonPruner):
    pass


@dataclass(frozen=True)
class Queued:
    """A trial the search runs before the sampler's: fixed ``params`` (a retry or a portfolio recipe).

    Backends add it to the study (``enqueue``) only just before they ask for their next trial, so a search that
    stops early leaves no WAITING trial behind; what was not run is found again by the next run.
    """

    params: dict[str, Any]
    user_attrs: dict[str, Any] = field(default_factory=dict)

    def enqueue(self, study: optuna.Study) -> None:
        study.enqueue_trial(self.params, user_attrs=self.user_attrs)


def recover_interrupted(study: optuna.Study) -> list[Queued]:
    """Interrupted trials are retried: those a crash (kill -9) left RUNNING are first recorded FAIL and
    marked ``interrupted``, like those a signal stopped; each one not yet retried (``retry_of``) is returned.

    Only a trial that got all its parameters (user attr ``knobs``, set once they are drawn) ran, so only such a
    trial is retried. One killed while Optuna wrote its parameters one by one holds some of them: retrying that
    part would draw the rest anew, a different trial. It is recorded ``interrupted`` and ``unstarted``; a portfolio
    recipe it was is still untried (:func:`portfolio_left` compares whole recipes) and runs again that way.
    """
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        if "knobs" not in trial.user_attrs:
            storage.set_trial_user_attr(trial._trial_id, "unstarted", True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    pending = [
        t for t in trials if t.user_attrs.get("interrupted") and "knobs" in t.user_attrs and t.number not in retried
    ]
    if pending:
        log.warning("resuming: %d interrupted trial(s) recorded FAIL and run again first", len(pending))
    return [Queued(dict(t.params), {"retry_of": t.number}) for t in pending]


def portfolio_left(
    study: optuna.Study, portfolio: Sequence[Mapping[str, Any]], *, held_back: Sequence[str] = ()
) -> list[Queued]:
    """The space's portfolio, recorded once in a new study (user attr ``portfolio``), less the recipes the
    study already tried: an interrupted search finishes its portfolio when it resumes, and never repeats it.

    ``held_back``: freeze modes whose recipes this run leaves out (the plan's, for a one-trial budget). They stay
    in the record, so the same study resumed with a larger budget runs them.
    """
    if not study.trials and "portfolio" not in study.user_attrs:
        study.set_user_attr("portfolio", [dict(recipe) for recipe in portfolio])
    recorded = study.user_attrs.get("portfolio", [])
    tried = [t.params for t in study.get_trials(deepcopy=False)]
    return [
        Queued(dict(r))
        for r in recorded
        if r.get("freeze") not in held_back and not any(all(p.get(k) == v for k, v in r.items()) for p in tried)
    ]


def systematic_error(study: optuna.Study) -> str | None:
    """The error that killed the first 3 trials, or the last 5 in a row: retrying it only burns the budget."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not t.user_attrs.get("interrupted") and "warm_start_from" not in t.user_attrs
    ]
    for window in (trials[:3], trials[-5:]):
        errors = {t.user_attrs.get("error") for t in window if t.state == TrialState.FAIL}
        if len(window) in (3, 5) and all(t.state == TrialState.FAIL for t in window) and len(errors) == 1:
            return errors.pop()
    return None


def no_complete_trial_error(study: optuna.Study) -> AutoftError:
    """Every trial failed or was pruned: one sentence with each distinct error and how many trials it hit."""
    trials = study.get_trials(deepcopy=False)
    errors: dict[str, int] = {}
    for t in trials:
        if "error" in t.user_attrs:
            errors[t.user_attrs["error"]] = errors.get(t.user_attrs["error"], 0) + 1
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    diverged = sum("diverged" in t.user_attrs for t in trials)
    detail = "; ".join(f"{e} ({n} trial{'s' if n > 1 else ''})" for e, n in sorted(errors.items(), key=lambda x: -x[1]))
    detail = (f"{len(errors)} distinct error(s): {detail}" if errors else "no errors were recorded") + (
        f"; {diverged} diverged (loss NaN/inf: lower the learning-rate range)" if diverged else ""
    )
    return AutoftError(
        f"No trial completed ({len(trials)} trials, {pruned} pruned). {detail}. "
        "Fix the cause and run the same command again: the study keeps what ran."
    )
