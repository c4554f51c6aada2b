"""The search controller: prepares model and data once, opens the study, runs a backend, exports the best.

Flow: ``prepare`` (model, data, device) -> ``open_study`` (storage, sampler, pruner; resume) ->
backend ``optimize`` (trials call ``_Executor``) -> best model in ``best/`` -> test score -> result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoft import data, export, models, results
from autoft.backends import local
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.space import load_space
from autoft.trial import EpochMetrics, Report, TrialOutcome, evaluate, resolve_device, run_trial

__all__ = ["Progress", "SearchResult", "Setup", "open_study", "prepare", "run_search", "train_recipe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A progress event for displays: ``kind`` is "trial_start", "epoch" or "trial_end"."""

    kind: str
    trial: int
    epoch: int = 0
    epochs: int = 0
    score: float | None = None
    best: float | None = None
    state: str = ""
    strategy: str = ""


@dataclass
class Setup:
    """What every trial shares, built once: the pretrained model, the decoded data, preprocessing, device."""

    base_model: nn.Module
    dataset: data.Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    device: torch.device


@dataclass
class SearchResult:
    """What a search found: the best trial, its score, where its model is, and the study itself."""

    best_trial: int
    best_score: float
    best_params: dict[str, Any]
    test_score: float | None
    model_dir: Path
    run_dir: Path
    study: optuna.Study = field(repr=False)

    @property
    def best_recipe(self) -> Recipe:
        return Recipe.from_params(self.best_params)


def prepare(config: SearchConfig) -> Setup:
    """Create the model (weights loaded once) and decode the data once, at the model's input size.

    >>> setup = prepare(SearchConfig(model="test_resnet", data=Path("data"), pretrained=False))  # doctest: +SKIP
    """
    if not config.data.exists():
        raise AutoftError(f"Data folder {config.data} does not exist; pass --data a folder of class sub-folders.")
    torch.manual_seed(config.seed)  # from-scratch and new-head initialization depend on it
    model = models.create(config.model, num_classes=1, pretrained=config.pretrained, weights=config.weights)
    preprocessing = models.data_config(model)
    dataset = data.load_image_folder(
        config.data,
        image_size=config.image_size or int(preprocessing["input_size"][-1]),
        val_fraction=config.val_fraction,
        seed=config.seed,
        interpolation=preprocessing["interpolation"],
    )
    torch.manual_seed(config.seed)
    model.reset_classifier(len(dataset.classes))  # the head fits the data's classes; weights loaded once above
    return Setup(
        base_model=model,
        dataset=dataset,
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        interpolation=preprocessing["interpolation"],
        device=resolve_device(config.device),
    )


def train_recipe(setup: Setup, recipe: Recipe, *, seed: int, report: Report | None = None) -> TrialOutcome:
    """Fine-tune once with a fixed recipe (no search), e.g. the untuned baseline.

    >>> outcome = train_recipe(setup, BASELINE, seed=0)  # doctest: +SKIP
    """
    return run_trial(
        setup.base_model,
        recipe,
        setup.dataset,
        mean=setup.mean,
        std=setup.std,
        device=setup.device,
        seed=seed,
        report=report or (lambda epoch, metrics: False),
    )


def open_study(config: SearchConfig) -> optuna.Study:
    """Create the study in its storage, or load it to continue: running the same command again resumes."""
    n_startup = max(3, min(10, (config.trials or 20) // 4))
    with warnings.catch_warnings():  # `group` (needed for conditional knobs) is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = (
            optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=n_startup, multivariate=True, group=True)
            if config.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=config.seed)
        )
    # Epoch-level reports: judge a trial only after its first epoch, and only once a few trials have finished.
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        if config.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=config.storage,
        study_name=config.study_name,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def _recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a crashed driver become FAIL (marked interrupted) and their parameters are retried."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params)
    if stale:
        log.warning("resuming: %d interrupted trial(s) recorded FAIL and queued again", len(stale))
    return len(stale)


def _systematic_error(study: optuna.Study) -> str | None:
    """The error that killed the first 3 trials, or the last 5 in a row: retrying it only burns the budget."""
    trials = [
        t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("interrupted")
    ]
    for window in (trials[:3], trials[-5:]):
        errors = {t.user_attrs.get("error") for t in window if t.state == TrialState.FAIL}
        if len(window) in (3, 5) and all(t.state == TrialState.FAIL for t in window) and len(errors) == 1:
            return errors.pop()
    return None


@dataclass(frozen=True)
class _Worker:
    """Trains one trial: picklable, so the Ray backend ships it (model and data inside) to its workers once."""

    config: SearchConfig
    setup: Setup

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        # The device is resolved where the trial runs: a Ray worker may have a GPU that the driver lacks.
        setup = dataclasses.replace(self.setup, device=resolve_device(self.config.device))
        return train_recipe(setup, Recipe.from_params(params), seed=self.config.seed + number, report=report)


class _Executor:
    """Runs one trial for a backend and keeps ``best/`` holding the best COMPLETE trial's weights."""

    def __init__(self, config: SearchConfig, setup: Setup, study: optuna.Study, progress: Callable[[Progress], None]):
        self.config, self.setup, self.progress = config, setup, progress
        self.worker = _Worker(config, setup)
        self.model_dir = config.run_dir / "best"
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.best_score = max((t.value for t in complete), default=-float("inf"))
        self.deadline = time.monotonic() + config.timeout if config.timeout else None

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        recipe = Recipe.from_params(params)
        self.progress(
            Progress("trial_start", number, epochs=recipe.epochs, best=self._best(), strategy=recipe.describe())
        )

        def report_and_show(epoch: int, metrics: EpochMetrics) -> bool:
            self.progress(Progress("epoch", number, epoch + 1, recipe.epochs, metrics.val_accuracy, self._best()))
            out_of_time = self.deadline is not None and time.monotonic() > self.deadline
            return report(epoch, metrics) or out_of_time

        outcome = self.worker(number, params, report_and_show)
        self.keep(number, params, outcome)
        return outcome

    def keep(self, number: int, params: dict, outcome: TrialOutcome) -> None:
        """Export the trial's best weights if it ran to its end and beats every COMPLETE trial so far.

        Called in the driver only (one trial at a time), so concurrent trials never race for ``best/``.
        """
        if not outcome.stopped_early and outcome.best_score > self.best_score:
            self._export(number, params, Recipe.from_params(params), outcome)

    def _best(self) -> float | None:
        return None if self.best_score == -float("inf") else self.best_score

    def _export(self, number: int, params: dict, recipe: Recipe, outcome: TrialOutcome) -> None:
        self.best_score = outcome.best_score
        dataset, cfg = self.setup.dataset, self.config
        meta = {
            "model": cfg.model,
            "num_classes": len(dataset.classes),
            "classes": list(dataset.classes),
            "image_size": dataset.image_size,
            "mean": list(self.setup.mean),
            "std": list(self.setup.std),
            "interpolation": self.setup.interpolation,
            "trial": number,
            "params": params,
            "strategy": recipe.describe(),
            "val_accuracy": outcome.best_score,
            "best_epoch": outcome.best_epoch,
            "study_name": cfg.study_name,
        }
        export.save_model(self.model_dir, outcome.best_state, meta)
        log.info(
            "trial %d is the new best (val accuracy %.4f): saved to %s",
            number,
            outcome.best_score,
            self.model_dir,
        )


def _should_stop(study: optuna.Study) -> bool:
    return _systematic_error(study) is not None


def _backend(cfg: SearchConfig) -> str:
    """``auto`` means Ray when a cluster address is given or more than one GPU is visible, else in-process."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.address is None and torch.cuda.device_count() <= 1:
        return "local"
    try:
        import ray  # noqa: F401
    except ImportError:
        log.warning("more than one GPU but Ray is not installed (pip install 'autoft[ray]'): running in-process")
        return "local"
    return "ray"


def _cluster(cfg: SearchConfig) -> Any:
    from autoft.backends.ray import Cluster

    return Cluster(
        address=cfg.address,
        cpus_per_trial=cfg.cpus_per_trial,
        gpus_per_trial=cfg.gpus_per_trial,
        max_concurrent=cfg.max_concurrent,
        storage_path=cfg.run_dir.resolve() / "ray",
    )


def _check_run_dir(run_dir: Path) -> None:
    """Fail before any training if results could not be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoftError(
            f"Cannot create run directory {run_dir} ({exc.strerror}); choose another with --run-dir."
        ) from None
    if not os.access(run_dir, os.W_OK):
        raise AutoftError(f"Run directory {run_dir} is not writable; choose another with --run-dir.")


def _no_complete_trial_error(study: optuna.Study) -> AutoftError:
    trials = study.get_trials(deepcopy=False)
    errors = sorted({t.user_attrs["error"] for t in trials if "error" in t.user_attrs})
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    detail = "; ".join(errors[:3]) or "no errors were recorded"
    return AutoftError(
        f"No trial completed ({len(trials)} trials, {pruned} pruned). Errors: {detail}. "
        "Fix the cause and run the same command again: the study keeps what ran."
    )


def run_search(config: SearchConfig, *, progress: Callable[[Progress], None] | None = None) -> SearchResult:
    """Run (or continue) a search and export the best fine-tuned model.

    >>> result = run_search(SearchConfig(model="test_resnet", data=Path("data"), trials=4))  # doctest: +SKIP
    >>> result.model_dir
    PosixPath('runs/test_resnet-data/best')
    """
    cfg = config.resolved()
    show = progress or (lambda event: None)
    _check_run_dir(cfg.run_dir)
    space = load_space(cfg.space).with_max_epochs(cfg.max_epochs)
    setup = prepare(cfg)
    cfg.save(cfg.run_dir / "config.yaml")
    log.info("data: %s", setup.dataset.summary())
    study = open_study(cfg)
    _recover_interrupted(study)
    remaining = None if cfg.trials is None else max(0, cfg.trials - results.finished_count(study))
    executor = _Executor(cfg, setup, study, show)

    def on_trial_end(trial: FrozenTrial) -> None:
        show(Progress("trial_end", trial.number, score=trial.value, best=executor._best(), state=trial.state.name))

    if remaining != 0:
        stop = dict(n_trials=remaining, timeout=cfg.timeout, on_trial_end=on_trial_end, should_stop=_should_stop)
        if _backend(cfg) == "ray":
            from autoft.backends import ray as ray_backend  # ray is optional: imported only when used

            ray_backend.optimize(study, space, executor.worker, executor.keep, cluster=_cluster(cfg), **stop)
        else:
            local.optimize(study, space, executor, **stop)
    results.write_trials_csv(study, cfg.run_dir / "trials.csv")
    systematic = _systematic_error(study)
    if systematic:
        raise AutoftError(f"Stopped the search: every recent trial failed with the same error: {systematic}")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise _no_complete_trial_error(study)
    return _finish(cfg, setup, study, executor.model_dir)


def _finish(cfg: SearchConfig, setup: Setup, study: optuna.Study, model_dir: Path) -> SearchResult:
    """Score the exported model on the test split (loaded back from disk, so the number is the file's)."""
    best = study.best_trial
    test_score = None
    if setup.dataset.test is not None and model_dir.is_dir():
        tuned = export.load_model(model_dir, device=str(setup.device))
        _, test_score = evaluate(tuned.model, setup.dataset.test, mean=setup.mean, std=setup.std, device=setup.device)
        export.update_config(model_dir, test_accuracy=test_score)
    return SearchResult(
        best_trial=best.number,
        best_score=best.value,
        best_params=best.params,
        test_score=test_score,
        model_dir=model_dir,
        run_dir=cfg.run_dir,
        study=study,
    )
