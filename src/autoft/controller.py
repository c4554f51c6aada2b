"""The search controller: the orchestration of one search, read top to bottom in :func:`run_search`.

Flow: ``preparation.prepare_models`` (each model's weights, the data read once through the task, device) ->
``study.open_study`` (storage, sampler; resume) -> ``selection`` (several models: drop the weak ones) ->
``plan.make_plan`` (probe, priors, ``--timeout`` budget; docs/controller.md; it sets the trials' length and the
pruner, once) -> a backend runs trials (retries, the portfolio, then the best recipe's neighbours from
``exploit``, then the sampler's) through a :class:`~autoft.runner.TrialRunner` while the
:class:`~autoft.keeper.RunFolder` keeps ``best/``, ``top/`` or ``pareto/`` -> ``final`` (soup or refit) -> test
score -> report.

Faults (docs/reliability.md): trials a crash left RUNNING are failed and retried on resume; a trial out of
device memory is retried once at half the batch size; the first SIGINT/SIGTERM stops the running trial at
its next step, writes what the search has and raises :class:`SearchInterrupted`; a second one acts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autoft import export, figures, final, plan, probe_cache, results, selection, tasks, warmstart
from autoft.backends import local
from autoft.budget import Budget
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.exploit import Exploit
from autoft.keeper import RunFolder, check_free_space, check_run_dir, exported_setup
from autoft.objectives import ParetoPoint
from autoft.preload import preload, settle_environment
from autoft.preparation import Setup, prepare_models
from autoft.recipe import Recipe, describe_knobs
from autoft.report import write_report
from autoft.runner import TrialRunner
from autoft.space import Space, load_space
from autoft.study import (
    Queued,
    create_pruner,
    no_complete_trial_error,
    open_study,
    portfolio_left,
    preload_storage,
    recover_interrupted,
    systematic_error,
)
from autoft.trial import EpochMetrics, Report, TrialOutcome, predict_logits, run_trial

if TYPE_CHECKING:  # ray is optional: its backend is imported only when used
    from autoft.backends.ray import Cluster

__all__ = ["Progress", "SearchInterrupted", "SearchResult", "run_search"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A progress event for displays: ``kind`` is "selection" (a model-selection measurement starts: ``strategy``
    says which), "trial_start", "epoch" or "trial_end"."""

    kind: str
    trial: int
    epoch: int = 0
    epochs: int = 0
    score: float | None = None
    best: float | None = None
    state: str = ""
    strategy: str = ""


@dataclass
class SearchResult:
    """What a search found: the best trial, its score, where its model is, and the study itself.

    With several objectives, ``pareto`` is the front (most accurate first; models in ``run_dir/pareto``) and
    the best trial is its knee (``objectives.KNEE_RULE``).
    """

    best_trial: int
    best_score: float
    best_params: dict[str, Any]
    test_score: float | None
    model_dir: Path
    run_dir: Path
    study: optuna.Study = field(repr=False)
    final: final.FinalModel | None = None  # what best/ holds: the best single trial, a soup or a refit
    objectives: tuple[str, ...] = ("accuracy",)
    pareto: list[ParetoPoint] = field(default_factory=list)

    @property
    def best_recipe(self) -> Recipe:
        return Recipe.from_params(self.best_params)


class SearchInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the search after it wrote what it had (trials.csv, the best model so far).

    ``result`` is the search so far (None when no trial completed); ``exit_code`` is 128 + the signal number.
    """

    def __init__(self, signum: int, result: SearchResult | None):
        self.signum, self.result = signum, result
        self.exit_code = 128 + signum
        super().__init__(f"search interrupted by {signal.Signals(signum).name}")


class _LocalTrial:
    """The in-process backend's "run one trial": shows progress, runs it, keeps it in the run folder."""

    def __init__(self, runner: TrialRunner, folder: RunFolder, progress: Callable[[Progress], None]):
        self.runner, self.folder, self.progress = runner, folder, progress

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        epochs = Recipe.from_params(params).epochs
        best = self.folder.best
        self.progress(Progress("trial_start", number, epochs=epochs, best=best, strategy=describe_knobs(params)))

        def report_and_show(epoch: int, metrics: EpochMetrics) -> bool:
            self.progress(Progress("epoch", number, epoch + 1, epochs, metrics.val_accuracy, self.folder.best))
            return report(epoch, metrics)

        outcome = self.runner(number, params, report_and_show)
        self.folder.keep(number, params, outcome)
        return outcome


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, received: list[int]) -> Iterator[None]:
    """The first SIGINT/SIGTERM sets ``stop`` (the running trial ends at its next step and the search writes
    what it has); the previous handlers come back at once, so a second Ctrl-C raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def handle(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()
        restore()
        log.warning(
            "%s: stopping after the running trial's current step (again to quit at once)",
            signal.Signals(signum).name,
        )

    for s in previous:
        signal.signal(s, handle)
    try:
        yield
    finally:
        restore()


def run_search(
    config: SearchConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    setup: Setup | dict[str, Setup] | None = None,
    on_plan: Callable[[plan.Plan], None] | None = None,
    started_at: float | None = None,
) -> SearchResult:
    """Run (or continue) a search and export the best fine-tuned model.

    ``--timeout`` covers the call, or counts from ``started_at`` (``time.time()``; the ``autoft`` command passes
    when autoft began to load, so its imports count too).

    ``setup`` reuses a model and data already prepared (``prepare(config)``, or ``prepare_models(config)`` for
    several models). With several models, model selection first drops the weak ones (``selection.py``) and
    the search chooses among the rest (the ``model`` knob). Ctrl-C or SIGTERM stops the
    running trial, writes trials.csv (the best model so far is already in ``best/``) and raises
    :class:`SearchInterrupted`. ``on_plan`` receives the plan (probe, priors, budget) before the first trial.

    >>> result = run_search(SearchConfig(model="test_resnet", data=Path("data"), trials=4))  # doctest: +SKIP
    >>> result.model_dir  # doctest: +SKIP
    PosixPath('runs/test_resnet-data/best')
    """
    started_wall = time.time() if started_at is None else min(started_at, time.time())  # --timeout covers it all
    started = time.monotonic() - (time.time() - started_wall)
    cfg = config.resolved()
    show = progress or (lambda event: None)
    check_run_dir(cfg.run_dir)
    preset = tasks.get(cfg.task).default_space if cfg.space == "default" else cfg.space  # text: the text preset
    space = load_space(preset, overrides=cfg.space_overrides, fixed=cfg.space_fixed, portfolio=cfg.portfolio)
    space = space.with_max_epochs(cfg.max_epochs)
    stop, received = threading.Event(), []
    with _stop_on_signals(stop, received):
        settle_environment(figures.IMPORTANCE_ENVIRONMENT)  # before any thread: the trials' preload writes none
        preload_storage(cfg)  # the study's imports load while the model and data do
        setups = setup if isinstance(setup, dict) else {cfg.models[0]: setup} if setup else prepare_models(cfg)
        for candidate in setups.values():
            check_free_space(cfg.run_dir, candidate.base_model)
        cfg.save(cfg.run_dir / "config.yaml")
        log.info("data: %s", next(iter(setups.values())).dataset.summary())
        study = open_study(cfg)
        retries = recover_interrupted(study)
        if len(cfg.models) > 1:  # the selection's time counts against --timeout: the plan's clock started above
            survivors = _select_models(cfg, setups, space, study, stop, show)
            setups = {m: setups[m] for m in survivors}  # the dropped models' weights and features are released
            space = selection.with_models(space, survivors)
        # Look before searching: probe, priors, budget. The plan sets the trials' length and the pruner, once.
        search_plan, space = _plan(cfg, next(iter(setups.values())), space, study, started)
        if on_plan is not None:
            on_plan(search_plan)
        study.pruner = create_pruner(search_plan.pruner, max_epochs=search_plan.max_epochs)
        budget = Budget.from_plan(search_plan.budget, started=started_wall) if search_plan.budget else None
        if cfg.warm_start_from is not None and not study.trials:  # seeded once, when the study is new
            warmstart.seed_study(study, space, cfg.warm_start_from)
        remaining = None if cfg.trials is None else max(0, cfg.trials - results.finished_count(study))
        # Interrupted trials run again first; a new, unseeded study then tries the space's strong recipes.
        recipes = getattr(space, "portfolio", ())
        portfolio = portfolio_left(study, recipes, held_back=search_plan.held_back) if cfg.warm_start else []
        queue = (retries + portfolio)[:remaining]
        final.restore_single(cfg.run_dir / "best", cfg.run_dir / "top")  # new trials meet a real trial
        folder = RunFolder(cfg, setups, study)
        runner = TrialRunner(cfg, setups, budget=budget, stop=stop)
        if remaining != 0 and not stop.is_set():
            _optimize(cfg, study, space, queue, runner, folder, show, remaining, budget, stop)
        results.write_trials_csv(study, cfg.run_dir / "trials.csv")
    setup = exported_setup(setups, folder.model_dir)  # the best model's data and preprocessing, for its scores
    if received:  # the handlers are restored by now: a second signal during the wrap-up acts at once
        partial, scored = _finish(cfg, setup, study, folder.model_dir) if results.trained_trials(study) else (None, {})
        write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device), **scored)
        raise SearchInterrupted(received[0], partial)
    systematic = systematic_error(study)
    if systematic or not results.trained_trials(study):
        write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device))  # says what failed
        if systematic:
            raise AutoftError(f"Stopped the search: every recent trial failed with the same error: {systematic}")
        raise no_complete_trial_error(study)
    final_model = final.make_final_model(cfg, setup, folder.model_dir)  # soup or refit into best/
    finished, scored = _finish(cfg, setup, study, folder.model_dir)
    write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device), **scored)  # reuses the test logits
    return dataclasses.replace(finished, final=final_model)


def _optimize(
    cfg: SearchConfig,
    study: optuna.Study,
    space: Space,
    queue: list[Queued],
    runner: TrialRunner,
    folder: RunFolder,
    show: Callable[[Progress], None],
    remaining: int | None,
    budget: Budget | None,
    stop: threading.Event,
) -> None:
    """Run the trials on the chosen backend until ``--trials`` finished, the budget's launch window closed, a
    signal came, or the same error keeps failing trials; the ``queue`` runs first."""

    preloading: list[threading.Thread] = []

    def on_trial_end(trial: FrozenTrial) -> None:
        score = trial.values[0] if trial.values else None
        show(Progress("trial_end", trial.number, score=score, best=folder.best, state=trial.state.name))
        if not preloading and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
            # The report's importances will be shown: their imports load while the next trials train.
            preloading.append(preload(figures.IMPORTANCE_MODULES, name="autoft-preload-importance"))

    window = budget.launch_window() if budget else None
    # After the portfolio, its best recipe's neighbours (with --no-warm-start there is no portfolio to follow).
    refill = Exploit(space, cfg.objectives) if cfg.exploit and cfg.warm_start else None
    limits = dict(queue=queue, refill=refill, n_trials=remaining, timeout=window, on_trial_end=on_trial_end,
                  finish_allowance=budget.finish_allowance if budget else 0.0)  # fmt: skip
    should_stop = lambda s: stop.is_set() or systematic_error(s) is not None  # noqa: E731
    try:
        if _backend(cfg) == "ray":
            from autoft.backends import ray as ray_backend  # ray is optional: imported only when used

            ray_backend.optimize(
                study, space, runner.detached(), folder.keep, cluster=_cluster(cfg), should_stop=should_stop, **limits
            )
        else:
            local.optimize(study, space, _LocalTrial(runner, folder, show), should_stop=should_stop, **limits)
    finally:  # the report must not meet a half-imported module: Plotly peeks at sys.modules for pandas
        for thread in preloading:
            thread.join()


def _select_models(
    cfg: SearchConfig,
    setups: dict[str, Setup],
    space: Space,
    study: optuna.Study,
    stop: threading.Event,
    show: Callable[[Progress], None],
) -> tuple[str, ...]:
    """The models the search chooses among: the study's recorded selection; else, for a study without trials and
    selection on, the survivors of a selection measured now; else all candidates. A study's ``model`` choices must
    never change (Optuna refuses a categorical whose choices differ), so a resumed study keeps what it had."""
    candidates = tuple(setups)
    rungs = selection.load_record(study, candidates)
    if rungs is None and (not cfg.model_selection or study.trials):  # a study's `model` choices never change
        log.info("no model selection: searching all of %s", ", ".join(candidates))
        return candidates
    if rungs is not None:
        log.info("model selection: reusing the study's record")
    else:

        def measuring(rung: str, recipe: Recipe) -> Callable[[str], float | None]:
            def measure(model: str) -> float | None:
                show(Progress("selection", 0, epochs=recipe.epochs, strategy=f"{rung} of {model}"))
                try:
                    outcome = run_trial(setups[model], recipe, seed=cfg.seed, stop=stop)
                except Exception as exc:  # a model that cannot train here ranks last; its trials would fail alike
                    log.warning("model selection: the %s of %s failed (%s: %s)", rung, model, type(exc).__name__, exc)
                    log.debug("model selection failure", exc_info=True)
                    return math.nan
                return None if outcome.interrupted else outcome.best_score

            return measure

        stages = [
            selection.Stage("linear probe", measuring("linear probe", selection.probe_recipe(cfg.max_epochs)), 1),
            selection.Stage(
                "short fine-tune",
                measuring("short fine-tune", selection.short_finetune_recipe(space, cfg.max_epochs)),
                runs_above=2,
            ),
        ]
        rungs = selection.run_rungs(candidates, stages)
        if rungs is None:  # stopped by a signal: decide nothing, record nothing
            return candidates
        selection.save_record(study, candidates, rungs)
    log.info("%s", selection.describe(rungs))
    return selection.final(candidates, rungs)


def _plan(
    cfg: SearchConfig, setup: Setup, space: Space, study: optuna.Study, started: float
) -> tuple[plan.Plan, Space]:
    """Measure (or reuse the study's measurements), shape the space with priors and plan ``--timeout``."""
    preset = isinstance(cfg.space, str) and not Path(cfg.space).suffix
    priors_off = "" if cfg.priors and preset else "--no-priors" if not cfg.priors else "your own space is authoritative"
    keep = [edit.partition("=")[0].partition(".")[0].strip() for edit in (*cfg.space_overrides, *cfg.space_fixed)]
    search_plan, space = plan.make_plan(
        setup,
        space,
        study.user_attrs,
        seed=cfg.seed,
        timeout=cfg.timeout,
        spent=lambda: time.monotonic() - started,
        max_epochs=cfg.max_epochs,
        pruner=cfg.pruner,
        priors_off=priors_off,
        keep=keep,
        final_model={"soup_models": cfg.keep_top if cfg.soup else 0, "refit": cfg.refit},  # their share of --timeout
        kept=probe_cache.slot(setup, seed=cfg.seed),  # None with --no-cache (no cache entry)
    )
    study.set_user_attr("plan", search_plan.record())  # the latest run's plan; the probe stays the first run's
    for line in search_plan.describe().splitlines():
        log.info("plan: %s", line)
    return search_plan, space


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


def _cluster(cfg: SearchConfig) -> Cluster:
    from autoft.backends.ray import Cluster

    return Cluster(
        address=cfg.address,
        cpus_per_trial=cfg.cpus_per_trial,
        gpus_per_trial=cfg.gpus_per_trial,
        max_concurrent=cfg.max_concurrent,
        storage_path=cfg.run_dir.resolve() / "ray",
    )


def _finish(
    cfg: SearchConfig, setup: Setup, study: optuna.Study, model_dir: Path
) -> tuple[SearchResult, dict[str, Any]]:
    """Score the exported model on the test split (loaded back from disk, so the number is the file's); also the
    loaded model and its test logits, for the report (``write_report``'s ``tuned`` and ``logits``): the wrap-up
    loads and evaluates the model once, not once for the score and again for the report."""
    best, front = results.best_trial(study, cfg.objectives)
    test_score, scored = None, {}
    if setup.dataset.test is not None and model_dir.is_dir():
        tuned = export.load_model(model_dir, device=str(setup.device))
        logits = predict_logits(tuned.model, setup.dataset.test, setup.task, setup.spec, device=setup.device)
        _, test_score = setup.task.score(logits, setup.dataset.test)
        export.update_config(model_dir, test_accuracy=test_score)
        tuned.meta["test_accuracy"] = test_score  # as the file now says: the report reads it from the model's meta
        scored = {"tuned": tuned, "logits": {"test": logits}}
    result = SearchResult(
        best_trial=best.number,
        best_score=best.values[0],
        best_params=results.knobs(best),
        test_score=test_score,
        model_dir=model_dir,
        run_dir=cfg.run_dir,
        study=study,
        objectives=cfg.objectives,
        pareto=front,
    )
    return result, scored
