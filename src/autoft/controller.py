"""The search controller: prepares model and data once, opens the study, runs a backend, exports the best.

Flow: ``prepare_models`` (each model's weights, the data decoded once, device) -> ``study.open_study``
(storage, sampler, pruner; resume) -> ``selection`` (several models: drop the weak ones) -> ``plan.make_plan``
(probe, priors, ``--timeout`` plan; docs/controller.md) -> backend ``optimize`` (trials call ``_Executor``,
which keeps ``best/``, ``top/`` or ``pareto/``) -> ``final`` (soup or refit) -> test score -> report.

Faults (docs/reliability.md): trials a crash left RUNNING are failed and retried on resume; a trial out of
device memory is retried once at half the batch size; the first SIGINT/SIGTERM stops the running trial at
its next step, writes what the search has and raises :class:`SearchInterrupted`; a second one acts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial
from torch import nn

from autoft import data, export, features, final, models, objectives, plan, prefix, results, selection, warmstart
from autoft.backends import local
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.features import FeatureCache
from autoft.objectives import ParetoPoint
from autoft.prefix import PrefixCache
from autoft.recipe import Recipe, describe_knobs
from autoft.report import write_report
from autoft.space import load_space
from autoft.study import create_pruner, no_complete_trial_error, open_study, recover_interrupted, systematic_error
from autoft.trial import EpochMetrics, Report, TrialOutcome, evaluate, resolve_device, run_trial

__all__ = [
    "Progress",
    "SearchInterrupted",
    "SearchResult",
    "Setup",
    "check_run_dir",
    "prepare",
    "prepare_models",
    "run_search",
    "train_recipe",
]

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
class Setup:
    """What every trial shares, built once: the pretrained model, the decoded data, preprocessing, device."""

    base_model: nn.Module
    dataset: data.Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    device: torch.device
    feature_cache: FeatureCache | None = None  # pooled features for head-only trials, built on first use
    prefix_cache: PrefixCache | None = None  # activations after a frozen prefix for partial fine-tuning, likewise
    compile: bool = False  # torch.compile each trial's training forward


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


def prepare(
    config: SearchConfig,
    *,
    model_name: str | None = None,
    decoded: dict[tuple[int, str], data.Dataset] | None = None,
    cache_share: float = 1.0,
) -> Setup:
    """Create the model (weights loaded once) and decode the data once, at the model's input size.

    ``model_name``: which of the config's models (default the first). ``decoded`` maps (image size,
    interpolation) to data already decoded so, which is reused; data decoded here is added to it.
    ``cache_share``: this model's share of the caches' stated bounds (a search over k models gives each 1/k).

    >>> setup = prepare(SearchConfig(model="test_resnet", data=Path("data"), pretrained=False))  # doctest: +SKIP
    """
    if not config.data.exists():
        raise AutoftError(f"Data folder {config.data} does not exist; pass --data a folder of class sub-folders.")
    torch.manual_seed(config.seed)  # from-scratch and new-head initialization depend on it
    name = model_name or config.models[0]
    model = models.create(name, num_classes=1, pretrained=config.pretrained, weights=config.weights)
    preprocessing = models.data_config(model)
    decoded = {} if decoded is None else decoded
    key = (config.image_size or int(preprocessing["input_size"][-1]), str(preprocessing["interpolation"]))
    if key not in decoded:
        decoded[key] = data.load_image_folder(
            config.data, image_size=key[0], val_fraction=config.val_fraction, seed=config.seed, interpolation=key[1]
        )
    dataset = decoded[key]
    torch.manual_seed(config.seed)
    model.reset_classifier(len(dataset.classes))  # the head fits the data's classes; weights loaded once above
    mean, std, device = tuple(preprocessing["mean"]), tuple(preprocessing["std"]), resolve_device(config.device)
    return Setup(
        base_model=model,
        dataset=dataset,
        mean=mean,
        std=std,
        interpolation=preprocessing["interpolation"],
        device=device,
        feature_cache=FeatureCache(
            model, dataset, mean=mean, std=std, device=device, max_bytes=int(cache_share * features.DEFAULT_MAX_BYTES)
        ),
        prefix_cache=PrefixCache(
            model,
            dataset,
            mean=mean,
            std=std,
            device=device,
            spill_dir=_spill_dir(config),
            max_memory_bytes=int(cache_share * prefix.DEFAULT_MAX_MEMORY_BYTES),
            max_disk_bytes=int(cache_share * prefix.DEFAULT_MAX_DISK_BYTES),
        ),
        compile=config.compile,
    )


def prepare_models(config: SearchConfig) -> dict[str, Setup]:
    """One :class:`Setup` per candidate model (``--model a,b``), in the order given; every name is checked first.

    Each model's weights load once; the data is decoded once per distinct (input size, interpolation) and that
    tensor is shared by every model that needs it (the train/val split depends only on the seed); each model
    has its own caches, each with a 1/k share of their stated bounds, so k models together stay within them
    (a model that selection drops frees its share; the others keep theirs). Memory held: every candidate's
    weights (resnet50: 100 MB in fp32), one uint8 copy of the images per distinct decode (N x 3 x S x S bytes:
    10,000 images at 224 px = 1.5 GB), and per model, once trials build them, its pooled features (N x D x 4
    bytes) and prefix activations. The controller releases the models that model selection drops.

    >>> setups = prepare_models(SearchConfig(model="resnet50,convnext_tiny", data=Path("data")))  # doctest: +SKIP
    """
    for name in config.models:  # a typo in the last name fails before the first model loads
        models.check_name(name)
    decoded: dict[tuple[int, str], data.Dataset] = {}
    share = 1 / len(config.models)
    return {name: prepare(config, model_name=name, decoded=decoded, cache_share=share) for name in config.models}


def _spill_dir(config: SearchConfig) -> Path | None:
    """Where the prefix cache spills past its memory bound: the run directory, when the search has one."""
    return config.run_dir / "prefix_cache" if config.run_dir is not None else None


def train_recipe(
    setup: Setup,
    recipe: Recipe,
    *,
    seed: int,
    report: Report | None = None,
    stop: threading.Event | None = None,
) -> TrialOutcome:
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
        stop=stop,
        feature_cache=setup.feature_cache,
        prefix_cache=setup.prefix_cache,
        compile_model=setup.compile,
    )


class _Worker:
    """Trains one trial where it runs (in-process, or shipped once to Ray workers with the model and data inside).

    Out of device memory, it tries once more at half the batch size; a second OOM fails the trial. ``stop`` is
    the signal handler's flag (in-process only: an Event cannot travel to another process).
    """

    def __init__(self, config: SearchConfig, setups: dict[str, Setup], stop: threading.Event | None = None):
        self.config, self.setups, self.stop = config, setups, stop

    def detached(self) -> _Worker:
        """A copy without the in-process stop flag, for backends that pickle the worker (every model's setup in it:
        shared data is pickled once)."""
        return _Worker(self.config, self.setups)

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        # The device is resolved where the trial runs: a Ray worker may have a GPU that the driver lacks.
        setup = dataclasses.replace(_setup_for(self.setups, params), device=resolve_device(self.config.device))
        recipe = Recipe.from_params(params)
        outcome = self._train_unless_oom(setup, recipe, number, report)
        if outcome is None:
            if recipe.batch_size < 2:
                raise torch.OutOfMemoryError(f"out of device memory at batch size {recipe.batch_size}")
            recipe = dataclasses.replace(recipe, batch_size=recipe.batch_size // 2)
            log.warning("trial %d ran out of device memory: retrying at batch size %d", number, recipe.batch_size)
            _free_device_memory(setup.device)
            try:
                outcome = self._train(setup, recipe, number, report)
            except torch.OutOfMemoryError as exc:
                raise torch.OutOfMemoryError(f"also at half the batch size ({recipe.batch_size}): {exc}") from None
            outcome.notes["oom_retry_batch_size"] = recipe.batch_size
        if len(self.config.objectives) > 1 and not outcome.stopped_early:  # the costs of the model it trained
            outcome.notes |= objectives.costs(
                setup.base_model, self.config.objectives, image_size=setup.dataset.image_size, device=setup.device
            )
        return outcome

    def _train(self, setup: Setup, recipe: Recipe, number: int, report: Report) -> TrialOutcome:
        return train_recipe(setup, recipe, seed=self.config.seed + number, report=report, stop=self.stop)

    def _train_unless_oom(self, setup: Setup, recipe: Recipe, number: int, report: Report) -> TrialOutcome | None:
        """Train, or None when the device ran out of memory (returning drops the failed attempt's tensors)."""
        try:
            return self._train(setup, recipe, number, report)
        except torch.OutOfMemoryError:
            log.debug("trial %d: out of memory at batch size %d", number, recipe.batch_size, exc_info=True)
            return None


def _setup_for(setups: dict[str, Setup], params: dict) -> Setup:
    """The setup of the trial's model (``model`` knob); the only one when the model is not searched."""
    return setups[params["model"]] if "model" in params else next(iter(setups.values()))


class _Executor:
    """Runs one trial for a backend and keeps ``best/`` holding the best COMPLETE trial's weights.

    With several objectives it keeps ``pareto/trial-N/`` for every trial on the front (deleting those that fall
    off) and ``best/`` holding the front's knee. Trials seeded by ``--warm-start`` have no model: they never count.
    """

    def __init__(
        self,
        config: SearchConfig,
        setups: dict[str, Setup],
        study: optuna.Study,
        progress: Callable[[Progress], None],
        stop: threading.Event,
    ):
        self.config, self.setups, self.progress = config, setups, progress
        self.worker = _Worker(config, setups, stop)
        self.model_dir, self.top_dir = config.run_dir / "best", config.run_dir / "top"
        self.study, self.pareto_dir = study, config.run_dir / "pareto"
        self.best_score = max((t.values[0] for t in results.trained_trials(study)), default=-float("inf"))
        # Set by run_search from the --timeout plan: a trial stops when one more epoch (at least epoch_ahead
        # seconds) would end past the deadline (monotonic clock).
        self.deadline: float | None = None
        self.epoch_ahead = 0.0

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        recipe = Recipe.from_params(params)
        self.progress(
            Progress("trial_start", number, epochs=recipe.epochs, best=self._best(), strategy=describe_knobs(params))
        )

        budget_stop: list[int] = []

        def report_and_show(epoch: int, metrics: EpochMetrics) -> bool:
            self.progress(Progress("epoch", number, epoch + 1, recipe.epochs, metrics.val_accuracy, self._best()))
            if report(epoch, metrics):  # the pruner's verdict comes first: a pruned trial stays PRUNED
                return True
            ahead = max(self.epoch_ahead, metrics.seconds) if self.epoch_ahead else 0.0  # the trial's own last epoch
            if self.deadline is not None and time.monotonic() + ahead > self.deadline:
                budget_stop.append(epoch + 1)
                return True
            return False

        outcome = self.worker(number, params, report_and_show)
        if budget_stop and outcome.stopped_early and not outcome.diverged and not outcome.interrupted:
            # The budget, not the pruner, ended it: its best epoch is a real model with a real score, so the
            # trial is COMPLETE (noted) and may become best/ (a 2-minute search once lost its best model so).
            outcome.stopped_early = False
            outcome.notes["stopped_by_budget"] = f"epoch {budget_stop[0]} of {recipe.epochs}"
        self.keep(number, params, outcome)
        return outcome

    def keep(self, number: int, params: dict, outcome: TrialOutcome) -> None:
        """Export the trial's best weights if it ran to its end and beats every COMPLETE trial so far.

        Called in the driver only (one trial at a time), so concurrent trials never race for ``best/``.
        """
        if "oom_retry_batch_size" in outcome.notes:  # it trained at half the batch size: export what it trained with
            params = params | {"batch_size": outcome.notes["oom_retry_batch_size"]}
        if outcome.stopped_early:
            return
        if len(self.config.objectives) > 1:
            self._keep_front(number, params, outcome)
            return
        keep_more = self.config.keep_top > 1
        if outcome.best_score > self.best_score:
            if keep_more and (self.model_dir / export.CONFIG).is_file():  # the old best becomes a runner-up
                old = json.loads((self.model_dir / export.CONFIG).read_text())["trial"]
                shutil.copytree(self.model_dir, self.top_dir / f"trial-{old:04d}", dirs_exist_ok=True)
            self.best_score = outcome.best_score
            self._export(self.model_dir, number, params, outcome)
        elif keep_more:
            self._export(self.top_dir / f"trial-{number:04d}", number, params, outcome)
        if keep_more:
            self._drop_beyond_top()

    def _keep_front(self, number: int, params: dict, outcome: TrialOutcome) -> None:
        """Export the trial if it is on the Pareto front, delete models that fell off it, copy the knee to best/."""
        names = self.config.objectives
        values = tuple(objectives.trial_values(names, outcome.best_score, outcome.notes))
        others = [ParetoPoint(t.number, tuple(t.values)) for t in results.trained_trials(self.study)]
        front = objectives.pareto_front([p for p in others if p.trial != number] + [ParetoPoint(number, values)], names)
        on_front = {p.trial for p in front}
        self.best_score = max(self.best_score, outcome.best_score)
        if number in on_front:
            folder = self.pareto_dir / f"trial-{number:04d}"
            self._export(folder, number, params, outcome)
            export.update_config(folder, objectives=dict(zip(names, values, strict=True)))
        for folder in self.pareto_dir.glob("trial-*"):
            if int(folder.name.removeprefix("trial-")) not in on_front:
                shutil.rmtree(folder)
        knee = objectives.knee(front, names)
        source = self.pareto_dir / f"trial-{knee.trial:04d}"
        if (source / export.CONFIG).is_file() and _exported_trial(self.model_dir) != knee.trial:
            _copy_model(source, self.model_dir)
            log.info("best/ is now trial %d, the knee of a %d-trial Pareto front", knee.trial, len(front))

    def _drop_beyond_top(self) -> None:
        """Keep ``best/`` and the next ``keep_top - 1`` models in ``top/``; delete the rest (no checkpoint bloat)."""
        kept = []
        for folder in sorted(self.top_dir.glob("trial-*")):
            meta = json.loads((folder / export.CONFIG).read_text())
            kept.append((-meta["val_accuracy"], meta["trial"], folder))
        for _, _, folder in sorted(kept)[self.config.keep_top - 1 :]:
            shutil.rmtree(folder)

    def _best(self) -> float | None:
        return None if self.best_score == -float("inf") else self.best_score

    def _export(self, directory: Path, number: int, params: dict, outcome: TrialOutcome) -> None:
        recipe, setup = Recipe.from_params(params), _setup_for(self.setups, params)
        dataset, cfg = setup.dataset, self.config
        meta = {
            "model": params.get("model", cfg.model),
            "num_classes": len(dataset.classes),
            "classes": list(dataset.classes),
            "image_size": dataset.image_size,
            "mean": list(setup.mean),
            "std": list(setup.std),
            "interpolation": setup.interpolation,
            "trial": number,
            "params": params,
            "strategy": recipe.describe(),
            "val_accuracy": outcome.best_score,
            "best_epoch": outcome.best_epoch,
            "study_name": cfg.study_name,
        }
        export.save_model(directory, outcome.best_state, meta)
        log.info("trial %d (val accuracy %.4f) saved to %s", number, outcome.best_score, directory)


def _exported_trial(directory: Path) -> int | None:
    """The trial whose model is in ``directory``, or None when there is none."""
    config = directory / export.CONFIG
    return json.loads(config.read_text())["trial"] if config.is_file() else None


def _copy_model(source: Path, target: Path) -> None:
    """Copy an exported model's files over another's, each written under a temporary name and renamed."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        partial = target / f".{file.name}.partial"
        shutil.copy2(file, partial)
        os.replace(partial, target / file.name)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()  # the failed attempt's model and activations may sit in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def check_run_dir(run_dir: Path) -> None:
    """Fail before any training if results could not be written: create the folder and write a probe file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoftError(
            f"Cannot create run directory {run_dir} ({exc.strerror}); choose another with --run-dir."
        ) from None
    probe = run_dir / ".autoft-write-probe"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise AutoftError(
            f"Run directory {run_dir} is not writable ({exc.strerror}); choose another with --run-dir."
        ) from None


def _check_free_space(run_dir: Path, model: nn.Module) -> None:
    """Fail before any training if the disk cannot hold the exported model (two copies: write, then rename)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = 2 * weights + (16 << 20)  # + room for the study, logs and trials.csv
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise AutoftError(
            f"Not enough free disk space in {run_dir}: {free / 2**20:.0f} MiB free, but saving the best model "
            f"needs about {need / 2**20:.0f} MiB; free some space or choose another --run-dir."
        )


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
) -> SearchResult:
    """Run (or continue) a search and export the best fine-tuned model.

    ``setup`` reuses a model and data already prepared (``prepare(config)``, or ``prepare_models(config)`` for
    several models). With several models, model selection first drops the weak ones (``selection.py``) and
    the search chooses among the rest (the ``model`` knob). Ctrl-C or SIGTERM stops the
    running trial, writes trials.csv (the best model so far is already in ``best/``) and raises
    :class:`SearchInterrupted`. ``on_plan`` receives the plan (probe, priors, budget) before the first trial.

    >>> result = run_search(SearchConfig(model="test_resnet", data=Path("data"), trials=4))  # doctest: +SKIP
    >>> result.model_dir
    PosixPath('runs/test_resnet-data/best')
    """
    started = time.monotonic()  # --timeout covers the whole call: preparation, probe, search, wrap-up
    cfg = config.resolved()
    show = progress or (lambda event: None)
    check_run_dir(cfg.run_dir)
    space = load_space(cfg.space, overrides=cfg.space_overrides, fixed=cfg.space_fixed)
    space = space.with_max_epochs(cfg.max_epochs)
    stop, received = threading.Event(), []
    with _stop_on_signals(stop, received):
        setups = setup if isinstance(setup, dict) else {cfg.models[0]: setup} if setup else prepare_models(cfg)
        setup = next(iter(setups.values()))
        for candidate in setups.values():
            _check_free_space(cfg.run_dir, candidate.base_model)
        cfg.save(cfg.run_dir / "config.yaml")
        log.info("data: %s", setup.dataset.summary())
        study = open_study(cfg)
        recover_interrupted(study)
        if len(cfg.models) > 1:  # the selection's time counts against --timeout: the plan's clock started above
            survivors = _select_models(cfg, setups, space, study, stop, show)
            setups = {m: setups[m] for m in survivors}  # the dropped models' weights and features are released
            space = selection.with_models(space, survivors)
            setup = setups[survivors[0]]  # the plan probes the first survivor (a selection already probed them all)
        # Look before searching (plan.py): probe, priors, the --timeout budget plan.
        search_plan, space = _plan(cfg, setup, space, study, started)
        if on_plan is not None:
            on_plan(search_plan)
        if search_plan.budget is not None:
            budget_plan = search_plan.budget
            cfg = dataclasses.replace(cfg, max_epochs=budget_plan.max_epochs, pruner=budget_plan.pruner)
            study.pruner = create_pruner(cfg.pruner, max_epochs=cfg.max_epochs)
        if cfg.warm_start_from is not None and not study.trials:  # seeded once, when the study is new
            warmstart.seed_study(study, space, cfg.warm_start_from)
        remaining = None if cfg.trials is None else max(0, cfg.trials - results.finished_count(study))
        if cfg.warm_start and not study.trials and not stop.is_set():  # a new, unseeded study tries strong recipes
            for params in list(getattr(space, "portfolio", ()))[:remaining]:  # no more than the budget runs
                study.enqueue_trial(dict(params))
        final.restore_single(cfg.run_dir / "best", cfg.run_dir / "top")  # new trials meet a real trial
        executor = _Executor(cfg, setups, study, show, stop)
        launch_window = None  # no --timeout: --trials alone ends the search
        if search_plan.budget is not None:  # no trial starts, and none runs on, when an epoch cannot fit
            search_end = started + search_plan.budget.spent + search_plan.budget.search
            launch_window = max(1e-3, search_end - search_plan.budget.epoch_seconds - time.monotonic())
            executor.deadline, executor.epoch_ahead = search_end, search_plan.budget.epoch_seconds

        def on_trial_end(trial: FrozenTrial) -> None:
            score = trial.values[0] if trial.values else None
            show(Progress("trial_end", trial.number, score=score, best=executor._best(), state=trial.state.name))

        if remaining != 0 and not stop.is_set():
            budget = dict(n_trials=remaining, timeout=launch_window, on_trial_end=on_trial_end)
            should_stop = lambda s: stop.is_set() or systematic_error(s) is not None  # noqa: E731
            if _backend(cfg) == "ray":
                from autoft.backends import ray as ray_backend  # ray is optional: imported only when used

                ray_backend.optimize(
                    study, space, executor.worker.detached(), executor.keep, cluster=_cluster(cfg),
                    should_stop=should_stop, **budget,
                )  # fmt: skip
            else:
                local.optimize(study, space, executor, should_stop=should_stop, **budget)
        results.write_trials_csv(study, cfg.run_dir / "trials.csv")
    setup = _exported_setup(setups, executor.model_dir)  # the best model's data and preprocessing, for its scores
    if received:  # the handlers are restored by now: a second signal during the wrap-up acts at once
        partial = _finish(cfg, setup, study, executor.model_dir) if results.trained_trials(study) else None
        write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device))
        raise SearchInterrupted(received[0], partial)
    systematic = systematic_error(study)
    if systematic or not results.trained_trials(study):
        write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device))  # says what failed
        if systematic:
            raise AutoftError(f"Stopped the search: every recent trial failed with the same error: {systematic}")
        raise no_complete_trial_error(study)
    final_model = final.make_final_model(cfg, setup, executor.model_dir)  # soup or refit into best/
    result = dataclasses.replace(_finish(cfg, setup, study, executor.model_dir), final=final_model)
    write_report(cfg.run_dir, dataset=setup.dataset, device=str(setup.device))
    return result


def _select_models(
    cfg: SearchConfig,
    setups: dict[str, Setup],
    space: Any,
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
                    outcome = train_recipe(setups[model], recipe, seed=cfg.seed, stop=stop)
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


def _exported_setup(setups: dict[str, Setup], model_dir: Path) -> Setup:
    """The setup of the model exported in ``model_dir`` (the first one when nothing is exported yet)."""
    config = model_dir / export.CONFIG
    exported = json.loads(config.read_text()).get("model") if config.is_file() else None
    return setups.get(exported) or next(iter(setups.values()))


def _plan(cfg: SearchConfig, setup: Setup, space: Any, study: optuna.Study, started: float) -> tuple[plan.Plan, Any]:
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
    )
    study.set_user_attr("plan", search_plan.record())  # the latest run's plan; the probe stays the first run's
    for line in search_plan.describe().splitlines():
        log.info("plan: %s", line)
    return search_plan, space


def _finish(cfg: SearchConfig, setup: Setup, study: optuna.Study, model_dir: Path) -> SearchResult:
    """Score the exported model on the test split (loaded back from disk, so the number is the file's).

    The best trial is the most accurate one this study trained (seeded trials have no model), or with several
    objectives the knee of the Pareto front of those trials.
    """
    trained, front = results.trained_trials(study), []
    if len(cfg.objectives) > 1:
        front = objectives.pareto_front([ParetoPoint(t.number, tuple(t.values)) for t in trained], cfg.objectives)
        knee = objectives.knee(front, cfg.objectives).trial
        best = next(t for t in trained if t.number == knee)
    else:
        best = max(trained, key=lambda t: (t.values[0], -t.number))
    test_score = None
    if setup.dataset.test is not None and model_dir.is_dir():
        tuned = export.load_model(model_dir, device=str(setup.device))
        _, test_score = evaluate(tuned.model, setup.dataset.test, mean=setup.mean, std=setup.std, device=setup.device)
        export.update_config(model_dir, test_accuracy=test_score)
    return SearchResult(
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
