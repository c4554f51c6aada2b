"""Runs one trial where it is placed (in this process, or on a Ray worker): the one callable every backend calls.

``TrialRunner(number, params, report) -> TrialOutcome``. Around :func:`autoft.trial.run_trial` it applies the
rules that must hold whichever backend runs the trial:

- the ``--timeout`` budget (:class:`~autoft.budget.Budget`): after an epoch, when one more would end past the
  search's deadline the trial stops, unless a part of one still fits: then it trains until the trial deadline
  and validates that shorter epoch (as it does with an epoch slower than planned that the deadline cuts);
  it is COMPLETE with its best epoch (noted ``stopped_by_budget``), not
  PRUNED, because its best epoch is a real model with a real score (a 2-minute search once lost its best model);
  the pruner is asked first, so a pruned trial stays PRUNED; the search's last trial (no other could start after
  it) that trains more than the head has its steps fitted to end at the trial deadline instead
  (:mod:`autoft.stretch`), so the time the plan's margins kept is used;
- out of device memory, one retry at half the batch size (a second OOM fails the trial);
- with several objectives, the costs of the model it trained.

The runner holds every model's setup, so a backend that pickles it ships the shared data once.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading

import torch

from autoft import objectives
from autoft.budget import Budget
from autoft.config import SearchConfig
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.trial import EpochMetrics, Report, TrialOutcome, resolve_device, run_trial

__all__ = ["TrialRunner", "setup_for"]

log = logging.getLogger(__name__)


class TrialRunner:
    """Trains one trial with its model's setup under the search's rules (budget, OOM retry, costs).

    ``stop`` is the signal handler's flag (in-process only: an Event cannot travel to another process).
    """

    def __init__(
        self,
        config: SearchConfig,
        setups: dict[str, Setup],
        *,
        budget: Budget | None = None,
        stop: threading.Event | None = None,
        threads: int | None = None,
    ):
        self.config, self.setups, self.budget, self.stop, self.threads = config, setups, budget, stop, threads

    def detached(self) -> TrialRunner:
        """A copy for backends that pickle the runner: no in-process stop flag, and torch's thread count set to
        the trial's CPUs (``--cpus-per-trial``) where it runs, so concurrent trials do not oversubscribe cores."""
        return TrialRunner(
            self.config, self.setups, budget=self.budget, threads=max(1, int(self.config.cpus_per_trial))
        )

    def __call__(self, number: int, params: dict, report: Report) -> TrialOutcome:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        # The device is resolved where the trial runs: a Ray worker may have a GPU that the driver lacks.
        setup = dataclasses.replace(setup_for(self.setups, params), device=resolve_device(self.config.device))
        recipe = Recipe.from_params(params)
        budget_stop: list[int] = []
        fills = self.budget is not None and recipe.train_blocks_at(recipe.epochs - 1) != 0
        fills = fills and self.budget.is_last(recipe.epochs)

        def report_within_budget(epoch: int, metrics: EpochMetrics) -> bool:
            if report(epoch, metrics):  # the pruner's verdict comes first: a pruned trial stays PRUNED
                return True
            if fills:  # its steps are fitted to the deadline, which cuts it should the machine slow down
                return False
            if self.budget is not None and not self.budget.next_epoch_fits(metrics.seconds):
                if epoch + 1 < recipe.epochs and self.budget.last_part_fits(metrics.seconds):
                    return False  # a last, shorter epoch: run_trial cuts it at the trial deadline and validates it
                budget_stop.append(epoch + 1)
                return True
            return False

        outcome = self._train_retrying_oom(setup, recipe, number, report_within_budget, fills=fills)
        if budget_stop:  # after an epoch; run_trial notes a mid-epoch stop by the deadline itself
            outcome.notes.setdefault("stopped_by_budget", f"epoch {budget_stop[0]} of {recipe.epochs}")
        cut = "stopped_by_budget" in outcome.notes
        if cut and outcome.stopped_early and not outcome.diverged and not outcome.interrupted:
            outcome.stopped_early = False  # the budget, not the pruner, ended it: COMPLETE with its best epoch
        if len(self.config.objectives) > 1 and not outcome.stopped_early:  # the costs of the model it trained
            example = setup.task.example_inputs(setup.dataset, setup.spec, device=setup.device)
            outcome.notes |= objectives.costs(setup.base_model, self.config.objectives, example=example)
        return outcome

    def _train_retrying_oom(
        self, setup: Setup, recipe: Recipe, number: int, report: Report, *, fills: bool
    ) -> TrialOutcome:
        outcome = self._train_unless_oom(setup, recipe, number, report, fills=fills)
        if outcome is not None:
            return outcome
        if recipe.batch_size < 2:
            raise torch.OutOfMemoryError(f"out of device memory at batch size {recipe.batch_size}")
        recipe = dataclasses.replace(recipe, batch_size=recipe.batch_size // 2)
        log.warning("trial %d ran out of device memory: retrying at batch size %d", number, recipe.batch_size)
        _free_device_memory(setup.device)
        try:
            outcome = self._train(setup, recipe, number, report, fills=fills)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(f"also at half the batch size ({recipe.batch_size}): {exc}") from None
        outcome.notes["oom_retry_batch_size"] = recipe.batch_size
        return outcome

    def _train(self, setup: Setup, recipe: Recipe, number: int, report: Report, *, fills: bool) -> TrialOutcome:
        budget = self.budget
        deadline = budget.trial_deadline if budget is not None else None
        return run_trial(
            setup, recipe, seed=self.config.seed + number, report=report, stop=self.stop, deadline=deadline,
            fill_until=deadline if fills else None, validation_seconds=budget.validation_seconds if budget else 0.0,
        )  # fmt: skip

    def _train_unless_oom(
        self, setup: Setup, recipe: Recipe, number: int, report: Report, *, fills: bool
    ) -> TrialOutcome | None:
        """Train, or None when the device ran out of memory (returning drops the failed attempt's tensors)."""
        try:
            return self._train(setup, recipe, number, report, fills=fills)
        except torch.OutOfMemoryError:
            log.debug("trial %d: out of memory at batch size %d", number, recipe.batch_size, exc_info=True)
            return None


def setup_for(setups: dict[str, Setup], params: dict) -> Setup:
    """The setup of the trial's model (``model`` knob); the only one when the model is not searched."""
    return setups[params["model"]] if "model" in params else next(iter(setups.values()))


def _free_device_memory(device: torch.device) -> None:
    gc.collect()  # the failed attempt's model and activations may sit in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
