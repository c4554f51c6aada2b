"""The Ray Tune backend: the same search, its trials spread over the GPUs and machines of a Ray cluster.

Optuna suggests (``study.ask`` in the driver), Ray Tune runs each trial on a worker, and the driver
tells Optuna the honest outcome, so the study in its storage stays the single record:

- every epoch a worker reports through ``tune.report``; the driver records the value in Optuna and asks
  the study's own pruner (``--pruner``) whether to stop; a trial stopped so is told PRUNED, with its
  intermediate values, never COMPLETE (the fault of Ray's stock ``OptunaSearch``);
- a trial that raises is reported FAIL with its error; a worker that dies is FAIL with Ray's error;
- a trial that ran all its epochs hands its best weights to a small holder actor; the driver takes
  them and exports ``best/`` itself, one trial at a time, so concurrent trials never race for it.

The model and the decoded data go into Ray's object store once (``tune.with_parameters``); the
trainable function captures nothing large. This is the only module that imports ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from autoft.errors import AutoftError
from autoft.objectives import EpochReports, study_objectives, trial_values
from autoft.space import Space
from autoft.trial import EpochMetrics, Report, TrialOutcome

__all__ = ["Cluster", "Keep", "Worker", "optimize"]

log = logging.getLogger(__name__)

# worker(number, params, report) -> outcome: trains one trial; picklable, shipped to the workers once.
Worker = Callable[[int, dict, Report], TrialOutcome]
# keep(number, params, outcome): the driver's "export it if it is the best"; called for COMPLETE trials only.
Keep = Callable[[int, dict, TrialOutcome], None]


@dataclass(frozen=True)
class Cluster:
    """Where and how wide: ``address`` of a running cluster (None starts one here) and each trial's share."""

    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: one GPU per trial when the cluster has GPUs, else none
    max_concurrent: int | None = None
    storage_path: Path | None = None  # Ray Tune's own small experiment files (no checkpoints are written)


@ray.remote(num_cpus=0)
class _Holder:
    """Holds finished trials' outcomes (best weights included) until the driver takes them."""

    def __init__(self) -> None:
        self._held: dict[int, TrialOutcome] = {}

    def put(self, number: int, outcome: TrialOutcome) -> None:
        self._held[number] = outcome

    def take(self, number: int) -> TrialOutcome | None:
        return self._held.pop(number, None)


def _trainable(config: dict, worker: Worker, holder: Any) -> None:
    """One trial on a Ray worker. The one place a trial's exceptions are caught (reported, then FAIL)."""
    number, params = config["number"], config["params"]
    node = ray.get_runtime_context().get_node_id()
    epochs = int(params.get("epochs", 0))

    def report(epoch: int, metrics: EpochMetrics) -> bool:
        tune.report(
            {
                "epoch": epoch,
                "epochs": epochs,
                "val_accuracy": metrics.val_accuracy,
                "val_loss": metrics.val_loss,
                "train_loss": metrics.train_loss,
                "seconds": metrics.seconds,
                "node_id": node,
            }
        )
        return False  # the driver stops a pruned trial by ending this worker's trial

    try:
        outcome = worker(number, params, report)
    except Exception as exc:
        log.exception("trial %d failed", number)
        tune.report({"error": f"{type(exc).__name__}: {exc}"[:2000], "node_id": node})
        return
    ray.get(holder.put.remote(number, outcome))
    tune.report({"complete": True, "node_id": node})


class _Bridge:
    """The driver's side: asks Optuna, records every epoch, decides pruning, tells each trial's outcome."""

    def __init__(
        self,
        study: optuna.Study,
        space: Space,
        keep: Keep,
        holder: Any,
        *,
        n_trials: int | None,
        on_trial_end: Callable[[FrozenTrial], None],
        should_stop: Callable[[optuna.Study], bool],
    ):
        self.study, self.space, self.keep, self.holder = study, space, keep, holder
        self.n_trials, self.on_trial_end, self.should_stop = n_trials, on_trial_end, should_stop
        self.trials: dict[str, optuna.Trial] = {}
        self.params: dict[str, dict] = {}  # the knobs each trial trains with (fixed values included)
        self.history: dict[str, list[dict]] = {}
        self.asked, self.stopping = 0, False
        self.epochs, self.objectives = EpochReports(study), study_objectives(study)

    def __getstate__(self) -> dict:
        # Tune pickles its searcher, stopper and callbacks to resume its own experiments. autoft resumes from
        # the Optuna study instead, so the bridge (an open study, the CLI's live display) is left out.
        return {}

    def ask(self, trial_id: str) -> dict | None:
        if self.stopping or (self.n_trials is not None and self.asked >= self.n_trials):
            return None
        trial = self.study.ask()
        params = self.space.sample(trial)
        trial.set_user_attr("knobs", params)
        self.asked += 1
        self.trials[trial_id], self.params[trial_id], self.history[trial_id] = trial, params, []
        return {"number": trial.number, "params": params}

    def report(self, trial_id: str, result: dict) -> bool:
        """Record an epoch in Optuna; True when the study's pruner stops the trial (never at its last epoch)."""
        trial = self.trials.get(trial_id)
        if trial is None or "epoch" not in result:
            return False
        if not self.history[trial_id]:
            trial.set_user_attr("node_id", result["node_id"])
        self.history[trial_id].append(result)
        prune = self.epochs.report(trial, result["epoch"], result["val_accuracy"])
        last_epoch = result["epoch"] + 1 >= result["epochs"]
        return not last_epoch and prune  # like the local backend: a full run is COMPLETE

    def finish(self, trial_id: str, result: dict | None, *, error: str | None = None) -> None:
        trial = self.trials.pop(trial_id, None)
        if trial is None:
            return
        history, params, result = self.history.pop(trial_id), self.params.pop(trial_id), result or {}
        outcome = ray.get(self.holder.take.remote(trial.number))  # always taken: the holder keeps nothing
        if history:
            scores = [r["val_accuracy"] for r in history]
            best_epoch = max(range(len(scores)), key=scores.__getitem__)
            trial.set_user_attr("best_epoch", best_epoch)
            trial.set_user_attr("best_score", scores[best_epoch])
            trial.set_user_attr("val_loss", [r["val_loss"] for r in history])
            trial.set_user_attr("train_loss", [r["train_loss"] for r in history])
            trial.set_user_attr("epoch_seconds", [round(r["seconds"], 3) for r in history])
        error = error or result.get("error")
        if error:
            trial.set_user_attr("error", error[:2000])
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, error)
        elif result.get("complete") and outcome is not None:
            for key, value in outcome.notes.items():
                trial.set_user_attr(key, value)
            if outcome.diverged:  # like the local backend: PRUNED with the reason, so the sampler learns from it
                trial.set_user_attr("diverged", outcome.diverged)
                frozen = self.study.tell(trial, state=TrialState.PRUNED)
            else:
                frozen = self.study.tell(trial, trial_values(self.objectives, outcome.best_score, outcome.notes))
                self.keep(trial.number, params, outcome)
        else:  # stopped by the pruner or by the time budget before its last epoch
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.on_trial_end(frozen)
        self.stopping = self.stopping or self.should_stop(self.study)

    def abandon(self) -> None:
        """Trials Tune never finished (time budget, driver stopping): PRUNED if they trained, else FAIL."""
        for trial_id in list(self.trials):
            self.finish(trial_id, None, error=None if self.history[trial_id] else "not run: the search stopped")


class _OptunaAsks(Searcher):
    def __init__(self, bridge: _Bridge):
        super().__init__()
        self.bridge = bridge

    def suggest(self, trial_id: str) -> dict | None:
        config = self.bridge.ask(trial_id)
        return Searcher.FINISHED if config is None else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Recorded by :class:`_Records`, which also sees a dead worker's error."""


class _Prunes(Stopper):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.bridge.report(trial_id, result)

    def stop_all(self) -> bool:
        return self.bridge.stopping


class _Records(tune.Callback):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.bridge.finish(trial.trial_id, trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        text = str(error).strip().splitlines()[-1] if error else "the trial's worker died"
        self.bridge.finish(trial.trial_id, trial.last_result, error=f"RayError: {text}")


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except ConnectionError as exc:
        raise AutoftError(
            f"Cannot reach the Ray cluster at --address {address!r} ({exc}); start it with `ray start --head` "
            "or check the address (`ray status` on the head node prints it)."
        ) from None


def _resources(cluster: Cluster) -> dict[str, float]:
    gpus = cluster.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cluster.cpus_per_trial, "gpu": gpus}


def optimize(
    study: optuna.Study,
    space: Space,
    worker: Worker,
    keep: Keep,
    *,
    cluster: Cluster,
    n_trials: int | None,
    timeout: float | None,
    on_trial_end: Callable[[FrozenTrial], None],
    should_stop: Callable[[optuna.Study], bool],
) -> None:
    """Run up to ``n_trials`` trials (or until ``timeout`` seconds) as Ray Tune trials on ``cluster``.

    >>> optimize(study, load_space("default"), executor.worker, executor.keep, cluster=Cluster(),
    ...          n_trials=10, timeout=None, on_trial_end=print, should_stop=lambda s: False)  # doctest: +SKIP
    """
    _connect(cluster.address)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables of Tune's own on the terminal
    holder = _Holder.remote()
    bridge = _Bridge(study, space, keep, holder, n_trials=n_trials, on_trial_end=on_trial_end, should_stop=should_stop)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, worker=worker, holder=holder),  # put in the object store once
        _resources(cluster),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_OptunaAsks(bridge),
            num_samples=n_trials if n_trials is not None else -1,
            max_concurrent_trials=cluster.max_concurrent,
            time_budget_s=timeout,
            # On this machine a worker that has imported torch and holds the data runs the next trial too; on a
            # cluster each trial gets a fresh worker, so Tune places it wherever resources are free.
            reuse_actors=cluster.address is None,
            trial_dirname_creator=lambda trial: f"trial-{trial.config['number']}",
        ),
        run_config=tune.RunConfig(
            name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(cluster.storage_path) if cluster.storage_path else None,
            stop=_Prunes(bridge),
            callbacks=[_Records(bridge)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    quiet = logging.getLogger("ray.tune.search.searcher"), logging.getLogger("ray.tune.analysis.experiment_analysis")
    for logger in quiet:  # "save not implemented" / "could not fetch metrics": Optuna's study is the record
        logger.setLevel(logging.ERROR)
    try:
        tuner.fit()
    finally:
        bridge.abandon()
        ray.kill(holder)
