"""The Ray Tune backend: the same search, its trials spread over the GPUs and machines of a Ray cluster.

Optuna suggests (``study.ask`` in the driver), Ray Tune runs each trial on a worker, and the driver
tells Optuna the honest outcome, so the study in its storage stays the single record:

- a trial exists in the study only once it really starts: Tune's trials carry a slot number, and the driver
  asks Optuna when Tune starts a slot's worker (the worker then fetches its number and knobs from a small
  holder actor); a slot that starts after the search stopped, or after the launch window (``timeout``), runs
  nothing and leaves no trial behind;
- every epoch a worker reports through ``tune.report``; the driver records the value in Optuna and asks
  the study's own pruner (``--pruner``) whether to stop; a trial stopped so is told PRUNED, with its
  intermediate values, never COMPLETE (the fault of Ray's stock ``OptunaSearch``);
- a trial that raises is reported FAIL with its error; a worker that dies is FAIL with Ray's error;
- a trial that ran all its epochs hands its best weights to the holder; the driver takes them and exports
  ``best/`` itself, one trial at a time, so concurrent trials never race for it;
- when the search stops (the controller's ``should_stop``: Ctrl-C / SIGTERM, or a systematic error), Tune
  ends the running trials and each is recorded FAIL with user attr ``interrupted`` (retried on resume), as
  the local backend does. Tune's own SIGINT handler is off, so the signal reaches autoft's and no Ray
  resume advice is printed: autoft resumes from the study, never with ``Tuner.restore``.

Ray's log records (start-up warnings included) go through Python logging like autoft's own: the CLI writes
them to ``search.log`` and shows them on the terminal only with ``-v``.

The model and the decoded data go into Ray's object store once (``tune.with_parameters``); the
trainable function captures nothing large. On a local Ray, data mapped from the decoded-data cache goes as the
file's path (``base.pickled_by_path``): every worker maps the same file, one copy per machine.
This is the only module that imports ray.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
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
from autoft.recipe import Recipe
from autoft.space import Space
from autoft.study import Queued, Refill
from autoft.tasks import base
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
    """Hands each started slot its trial (number, knobs), and holds finished trials' outcomes (best weights
    included) until the driver takes them."""

    def __init__(self) -> None:
        self._jobs: dict[int, tuple[int, dict] | None] = {}
        self._held: dict[int, TrialOutcome] = {}

    def assign(self, slot: int, job: tuple[int, dict] | None) -> None:
        self._jobs[slot] = job

    def job(self, slot: int) -> tuple[int, dict] | None:
        return self._jobs.pop(slot, None)

    def put(self, number: int, outcome: TrialOutcome) -> None:
        self._held[number] = outcome

    def take(self, number: int) -> TrialOutcome | None:
        return self._held.pop(number, None)


def _trainable(config: dict, worker: Worker, holder: Any) -> None:
    """One trial on a Ray worker. The one place a trial's exceptions are caught (reported, then FAIL)."""
    job = ray.get(holder.job.remote(config["slot"]))  # assigned by the driver as Tune started this worker
    if job is None:  # the search stopped, or its launch window closed, before this slot started: nothing to run
        tune.report({"skipped": True})  # a result, or Tune's progress printer says "completed" on stdout
        return
    number, params = job
    node = ray.get_runtime_context().get_node_id()
    epochs = Recipe.epochs_of(params)

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
    """The driver's side: asks Optuna as trials start, records every epoch, decides pruning, tells each outcome."""

    def __init__(
        self,
        study: optuna.Study,
        space: Space,
        keep: Keep,
        holder: Any,
        *,
        n_trials: int | None,
        launch_end: float | None,
        on_trial_end: Callable[[FrozenTrial], None],
        should_stop: Callable[[optuna.Study], bool],
        queue: Sequence[Queued] = (),
        refill: Refill | None = None,
        finish_allowance: float = 0.0,
    ):
        self.study, self.space, self.keep, self.holder, self.queue = study, space, keep, holder, list(queue)
        self.refill = refill
        self.n_trials, self.launch_end = n_trials, launch_end
        self.on_trial_end, self.should_stop = on_trial_end, should_stop
        self.trials: dict[str, optuna.Trial] = {}
        self.params: dict[str, dict] = {}  # the knobs each trial trains with (fixed values included)
        self.history: dict[str, list[dict]] = {}
        self.slots, self.started, self.stopping, self.polled = 0, 0, False, 0.0
        self.epochs = EpochReports(study, finish_allowance=finish_allowance)
        self.objectives = study_objectives(study)

    def __getstate__(self) -> dict:
        # Tune pickles its searcher, stopper and callbacks to resume its own experiments. autoft resumes from
        # the Optuna study instead, so the bridge (an open study, the CLI's live display) is left out.
        return {}

    def may_launch(self, *, first: bool) -> bool:
        """False once the search is stopping or the launch window has closed: no trial may start after that.

        The run's ``first`` trial starts whatever the window, as in the local backend (Optuna's ``study.optimize``
        starts its first trial at once): Ray's start-up (workers importing torch) is not in the plan's estimate.
        """
        in_window = self.launch_end is None or time.monotonic() < self.launch_end
        return not self.stopping and (first or in_window)

    def slot(self) -> dict | None:
        """A Tune trial's config: only a slot number, for the knobs are asked when (and if) it starts."""
        if not self.may_launch(first=self.slots == 0) or (self.n_trials is not None and self.slots >= self.n_trials):
            return None
        self.slots += 1
        return {"slot": self.slots - 1}

    def start(self, trial_id: str, slot: int) -> None:
        """Tune started a slot's worker: ask Optuna now, so that only trials that really start are in the study."""
        job = None
        self.stopping = self.stopping or self.should_stop(self.study)  # asked now: no trial starts after Ctrl-C
        if self.may_launch(first=self.started == 0):
            if not self.queue and self.refill is not None:  # the exploit phase, once trials have finished
                self.queue = list(self.refill(self.study))
            if self.queue:  # a retry, a portfolio recipe or a neighbour: into the study only now, as it starts
                self.queue.pop(0).enqueue(self.study)
            trial = self.study.ask()
            params = self.space.sample(trial)
            trial.set_user_attr("knobs", params)
            self.trials[trial_id], self.params[trial_id], self.history[trial_id] = trial, params, []
            self.started += 1
            job = (trial.number, params)
        ray.get(self.holder.assign.remote(slot, job))  # before Tune tells the worker to train

    def stop_all(self) -> bool:
        """Whether the search is stopping; the controller's ``should_stop`` (a signal) is asked twice a second."""
        if not self.stopping and time.monotonic() - self.polled > 0.5:
            self.polled = time.monotonic()
            self.stopping = self.should_stop(self.study)
        return self.stopping

    def report(self, trial_id: str, result: dict) -> bool:
        """Record an epoch in Optuna; True when the study's pruner stops the trial (never at its last epoch)."""
        trial = self.trials.get(trial_id)
        if trial is None or "epoch" not in result:
            return False
        if not self.history[trial_id]:
            trial.set_user_attr("node_id", result["node_id"])
        self.history[trial_id].append(result)
        left = (result["epochs"] - result["epoch"] - 1) * result["seconds"]
        prune = self.epochs.report(trial, result["epoch"], result["val_accuracy"], seconds_left=left)
        last_epoch = result["epoch"] + 1 >= result["epochs"]
        return not last_epoch and prune  # like the local backend: a full run is COMPLETE

    def finish(self, trial_id: str, result: dict | None, *, error: str | None = None, cut: bool = False) -> None:
        """Tell Optuna how a trial ended; ``cut``: Tune ended it because the search stopped."""
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
        if outcome is not None:  # it ran to its end (it may have been cut just after): its outcome is the record
            frozen = self._tell_outcome(trial, params, outcome)
        elif error:
            trial.set_user_attr("error", error[:2000])
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, error)
        elif cut:  # like the local backend after Ctrl-C: FAIL + interrupted, run again on resume
            trial.set_user_attr("interrupted", True)
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d interrupted: recorded FAIL, it runs again when the search resumes", trial.number)
        else:  # stopped by the pruner before its last epoch
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.on_trial_end(frozen)
        self.stopping = self.stopping or self.should_stop(self.study)

    def _tell_outcome(self, trial: optuna.Trial, params: dict, outcome: TrialOutcome) -> FrozenTrial:
        """A trial its worker finished: COMPLETE (exported if best), or PRUNED when it diverged or stopped early.

        A trial that the time budget stopped comes back with ``stopped_early`` False and ``notes["stopped_by_budget"]``:
        COMPLETE with its best epoch, as in the local backend.
        """
        for key, value in outcome.notes.items():
            trial.set_user_attr(key, value)
        if outcome.diverged:  # like the local backend: PRUNED with the reason, so the sampler learns from it
            trial.set_user_attr("diverged", outcome.diverged)
            return self.study.tell(trial, state=TrialState.PRUNED)
        if outcome.stopped_early:
            return self.study.tell(trial, state=TrialState.PRUNED)
        frozen = self.study.tell(trial, trial_values(self.objectives, outcome.best_score, outcome.notes))
        self.keep(trial.number, params, outcome)
        return frozen

    def abandon(self) -> None:
        """Trials that Tune ended because the search stopped (or that ``fit`` left behind): FAIL + interrupted."""
        for trial_id in list(self.trials):
            self.finish(trial_id, None, cut=True)


class _OptunaAsks(Searcher):
    def __init__(self, bridge: _Bridge):
        super().__init__()
        self.bridge = bridge

    def suggest(self, trial_id: str) -> dict | None:
        config = self.bridge.slot()
        return Searcher.FINISHED if config is None else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Recorded by :class:`_Records`, which also sees a dead worker's error."""


class _Prunes(Stopper):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.bridge.report(trial_id, result)

    def stop_all(self) -> bool:
        return self.bridge.stop_all()


class _Records(tune.Callback):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.bridge.start(trial.trial_id, trial.config["slot"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.bridge.finish(trial.trial_id, trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        text = str(error).strip().splitlines()[-1] if error else "the trial's worker died"
        self.bridge.finish(trial.trial_id, trial.last_result, error=f"RayError: {text}")


def _connect(address: str | None) -> bool:
    """Start Ray here (``address`` None) or join a cluster, keeping autoft's signal handlers and logging; True
    when this call connected (the search then disconnects at its end: a local Ray it started stops with it).

    ``ray.init`` installs SIGTERM handlers that exit at once; the handlers in place before it (the controller's:
    stop after the current step) come back. Ray's own logger stops printing to stderr and passes its records on
    to the application's logging instead (the CLI: search.log, and the terminal with ``-v``).
    """
    if ray.is_initialized():
        return False
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    options: dict[str, Any] = {"configure_logging": False, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # "local", not None: with None Ray joins whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names (a
        # `ray start` of last week, dead or alive) and the search hangs or lands on it; no --address means here.
        ray.init(address=address or "local", **options)
    except ConnectionError as exc:
        raise AutoftError(
            f"Cannot reach the Ray cluster at --address {address!r} ({exc}); start it with `ray start --head` "
            "or check the address (`ray status` on the head node prints it)."
        ) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    return True


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
    queue: Sequence[Queued] = (),
    refill: Refill | None = None,
    finish_allowance: float = 0.0,
) -> None:
    """Run up to ``n_trials`` trials as Ray Tune trials on ``cluster``, the ``queue`` first (each added to the
    study only as its trial starts), then what ``refill(study)`` queues when it runs dry (the exploit phase);
    none starts after ``timeout`` seconds.

    ``timeout`` is a launch window, as in the local backend: trials running when it closes run on (the worker's
    own deadline rule ends them). ``should_stop`` becoming true (Ctrl-C) ends the running trials, recorded FAIL
    + ``interrupted``. The pruner does not stop a trial with at most ``finish_allowance`` seconds left to run.

    >>> optimize(study, load_space("default"), executor.worker, executor.keep, cluster=Cluster(),
    ...          n_trials=10, timeout=None, on_trial_end=print, should_stop=lambda s: False)  # doctest: +SKIP
    """
    launch_end = None if timeout is None else time.monotonic() + timeout
    # Written before Ray's threads start (they call getenv at any time; autoft.preload says why that matters), and
    # only when not set yet, so a second search in a process where Ray already runs writes nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables of Tune's own on the terminal
    if os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") != "1":  # Ctrl-C is the controller's: it records, Tune's not
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    connected = _connect(cluster.address)
    holder = _Holder.remote()
    bridge = _Bridge(
        study, space, keep, holder,
        n_trials=n_trials, launch_end=launch_end, on_trial_end=on_trial_end, should_stop=should_stop, queue=queue,
        refill=refill, finish_allowance=finish_allowance,
    )  # fmt: skip
    # Put in the object store once; on this machine (a local Ray) mapped data goes as its cache file's path, so the
    # workers map the one copy in the page cache instead of each unpickling its own (a cluster's nodes get bytes).
    with base.pickled_by_path(cluster.address is None):
        parameters = tune.with_parameters(_trainable, worker=worker, holder=holder)
    trainable = tune.with_resources(parameters, _resources(cluster))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_OptunaAsks(bridge),
            num_samples=n_trials if n_trials is not None else -1,
            max_concurrent_trials=cluster.max_concurrent,
            # On this machine a worker that has imported torch and holds the data runs the next trial too; on a
            # cluster each trial gets a fresh worker, so Tune places it wherever resources are free.
            reuse_actors=cluster.address is None,
            trial_dirname_creator=lambda trial: f"slot-{trial.config['slot']}",
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
        if connected:  # Ray started (or joined) for this search: its workers and object store go with it
            ray.shutdown()
