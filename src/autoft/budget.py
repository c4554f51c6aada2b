"""The ``--timeout`` budget: how the plan spends it (:func:`plan_budget`) and how both backends apply it
(:class:`Budget`: the deadline, "will the next epoch fit", the launch window).

The plan is made once, before the first trial; the :class:`Budget` it yields travels with each trial's worker
(in-process or to Ray workers), so every backend stops trials by the same rule.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection
from dataclasses import dataclass

from autoft.errors import AutoftError
from autoft.probe import DataProfile, Probe
from autoft.step_cost import cost_family

__all__ = ["CHEAP_FINISH", "EPOCH_SAFETY", "LAST_PART", "Budget", "BudgetPlan", "plan_budget", "wrap_up_fixed_seconds"]


# One epoch of a sampled recipe may cost more than the probe's (stronger augmentation, smaller batches,
# evaluation variance): the plan counts each epoch at this multiple of the measured full fine-tuning epoch.
# Measured: the probe's estimate was within 3% of the real epoch (30.1 s vs 30.7 s, digits, 1 thread); 1.5
# left a third of a 2-minute budget unused, and a running trial is judged by its own pace anyway.
EPOCH_SAFETY = 1.15
FULL_TRIALS = 3  # the epochs per trial are set so that this many full-length trials fit, when the budget allows
# ... unless each would get fewer epochs than this: then one trial may use the whole search time. Measured
# (benchmarks/quality.py, 2-minute budgets, 1 thread): 1-epoch trials reached 0.57-0.59 val on digits where one
# 4-6 epoch fine-tune reached 0.94-0.96; 3-epoch trials lost 10 points to one 6-epoch fine-tune on glyphs.
MIN_USEFUL_EPOCHS = 3
# ... and fewer optimizer steps than this (at the largest batch the space offers): what counts is the number of
# updates, not of passes. Measured: on digits (23 steps per epoch at batch 64) 4-6 epoch fine-tunes (92-138
# steps) reached 0.94-0.96 where 1-epoch trials reached 0.57-0.59; on issue 14's few-shot task (600 images)
# trials of ~30 steps reached 0.705 test accuracy and one trial of ~190 steps 0.794.
MIN_USEFUL_STEPS = 120
# The wrap-up besides evaluating val and test once (load the best model, write trials.csv, the report's figures,
# fANOVA importances and page): benchmarks/fixed_cost.py on the demo at load 6.5 on 2 cores measured a 17.9 s
# wrap-up (7.8 s test score, 10.0 s report) of which 15.1 s were the two evaluations (720 images x 21 ms), so
# 2.8 s fixed; the old wrap-up's 5.1 s at load ~10 had three evaluations. 5 s covers a load of ~10. Plus a
# slack of 3% of the budget for jitter.
WRAP_UP_FIXED_SECONDS = 5.0  # where the machine's load cannot be read (wrap_up_fixed_seconds)
# The same fixed part on an idle machine, scaled by the load: it is Python work (figures, SQLite, HTML) that slows as
# the trials do. benchmarks/fixed_cost.py on the demo, 2026-12-04, load 1.5 on 2 cores: wrap-up 1.6-2.0 s, of which
# ~0.9 s the test evaluation (counted apart), so 0.7-1.1 s fixed; at load 6.5 the older wrap-up's was 2.8 s (x3.25
# load per core: 6.5 s reserved). The flat 5 s left 4-5 s of a quiet 30 s budget unused.
IDLE_WRAP_UP_FIXED_SECONDS = 2.0
SLACK = 0.03
HYPERBAND_FROM_EPOCHS = 9  # rungs at 1, 3, 9 epochs need trials at least this long to cut anything
# When the search time holds fewer than MIN_USEFUL_EPOCHS passes over train (a 30 s budget; MiniLM on 2,000 tweets
# in 3 minutes), a trial's epoch becomes a round of N examples (``Recipe.epoch_examples``), sized so that the first
# trial gets this many rounds, each validated: it keeps its best round, and the budget can stop it between them.
ROUNDS = 3
# After an epoch, when one more does not fit before the search's end but this share of one (and a validation)
# does, the trial trains on until the deadline and validates that last, shorter epoch instead of stopping: at 3
# minutes on 1,450 NER sentences a trial stopped after 1 epoch of ~60 s left 42 s of the search unused.
LAST_PART = 0.25
# A trial whose remaining epochs cost at most this share of the search time runs to its end whatever the pruner
# says (objectives.EpochReports). Optuna's median pruner compares a trial with the completed ones, here the
# portfolio's strongest recipes, and stopped 71-90 % of each 3-minute search's trials at their second epoch; on
# dots-few (seed 0) it stopped the exploit move that, run to its end, won the search (val 0.487 against 0.469,
# test +6.8 points), to save 2.4 s of 180. Stopping a trial pays for a new one; a few seconds pay for none.
CHEAP_FINISH = 0.02


@dataclass(frozen=True)
class BudgetPlan:
    """How ``--timeout`` is spent: what is gone (preparation, probe), what the wrap-up keeps, and the fidelity
    that fits the rest (epochs per trial, pruner, expected trials). All times in seconds.
    """

    timeout: float
    spent: float
    wrap_up: float
    search: float
    epoch_seconds: float
    max_epochs: int
    pruner: str
    expected_trials: int
    epoch_mode: str = "full"  # the freeze mode family whose epoch the plan counts: the costliest the space offers
    epoch_examples: int = 0  # 0: an epoch is a pass over train; N: a round of N examples (a pass does not fit)
    head_passes: bool = False  # with rounds: head-only trials keep whole passes (ROUNDS of them fit the search)
    validation_seconds: float = 0.0  # one val evaluation, with the margin: a cut epoch's training ends this early


def wrap_up_fixed_seconds() -> float:
    """The wrap-up's fixed part to reserve now: IDLE_WRAP_UP_FIXED_SECONDS x the 1-minute load average per usable
    core (at least 1: this search's own threads load the cores it uses); WRAP_UP_FIXED_SECONDS where the load
    average cannot be read (Windows).

    >>> 2.0 <= wrap_up_fixed_seconds()
    True
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return WRAP_UP_FIXED_SECONDS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return IDLE_WRAP_UP_FIXED_SECONDS * max(1.0, load / max(1, cores))


def plan_budget(
    timeout: float,
    measured: Probe,
    profile: DataProfile,
    *,
    spent: float,
    max_epochs: int,
    pruner: str,
    soup_models: int = 0,
    refit: bool = False,
    steps_per_epoch: int | None = None,
    modes: Collection[str] = (),
    smallest_round: int = 1,
    wrap_up_fixed: float = WRAP_UP_FIXED_SECONDS,
) -> BudgetPlan:
    """Fit the search to ``timeout`` seconds, of which ``spent`` are gone.

    wrap_up = ``wrap_up_fixed`` (the search passes :func:`wrap_up_fixed_seconds`) + eval cost of test (val when
    there is no test split) + SLACK x timeout, plus the final model's
    cost: a soup of up to ``soup_models`` kept models evaluates val ``soup_models + 1`` times; ``refit`` trains
    once more for max_epochs epochs on train+val (so max_epochs is chosen with that refit reserved too);
    search = timeout - spent - wrap_up; epoch = EPOCH_SAFETY x the measured epoch of the costliest freeze mode among
    ``modes`` (the space's freeze choices; none given: full fine-tuning), never below a head-only epoch;
    max_epochs = clamp(search / (FULL_TRIALS x epoch), 1, --max-epochs) when that is at least MIN_USEFUL_EPOCHS
    and (given ``steps_per_epoch``, the optimizer steps of an epoch at the space's largest batch) gives a trial
    at least MIN_USEFUL_STEPS updates; else clamp(search / epoch, 1, --max-epochs): one trial may take it all;
    expected trials = search / (epoch x (max_epochs + 1.5) / 2)  (about half run to the end, half are pruned
    after 1-2 epochs). The default median pruner becomes hyperband when trials may run HYPERBAND_FROM_EPOCHS+.
    When the search time holds fewer than MIN_USEFUL_EPOCHS epochs, epochs become ROUNDS rounds of fewer examples
    (at least ``smallest_round``: the space's largest batch) that share it (:func:`_in_rounds`).

    >>> plan_budget(600, measured, profile, spent=20, max_epochs=10, pruner="median").max_epochs  # doctest: +SKIP
    10
    """
    # The exported model is evaluated once: on test (the score; the report reuses its logits), else on val (the
    # report's sections).
    evaluations = measured.eval_seconds_per_image * (profile.test or profile.val)
    if soup_models >= 2:
        evaluations += (soup_models + 1) * measured.eval_seconds_per_image * profile.val
    wrap_up = wrap_up_fixed + evaluations + SLACK * timeout
    epoch_mode, epoch = _costliest(measured, modes)
    epoch = EPOCH_SAFETY * max(epoch, 1e-3)
    validation = min(epoch, EPOCH_SAFETY * (measured.eval_seconds_per_image or 0.0) * profile.val)
    if refit:  # the refit's epochs cost (train + val) / train of a search epoch; reserve them for the longest trial
        refit_epoch = epoch * (profile.train + profile.val) / max(profile.train, 1)
        room = timeout - spent - wrap_up
        epochs_fit = max(1, min(max_epochs, int(room // (FULL_TRIALS * epoch + refit_epoch))))
        wrap_up += epochs_fit * refit_epoch
    search = timeout - spent - wrap_up
    fits = int(search // epoch) if search > 0 else 0  # epochs of full fine-tuning the search time holds in all
    if fits < MIN_USEFUL_EPOCHS:  # not even one trial of a few passes: rounds of fewer examples, or a refusal
        return _in_rounds(timeout, spent, wrap_up, search, epoch, validation, epoch_mode, measured, profile,
                          smallest_round, max_epochs=max_epochs, pruner=pruner)  # fmt: skip
    # Three useful trials fit: share the time. Otherwise one trial takes it all (the portfolio's first
    # fine-tune, like the untuned recipe would): short trials of a small budget learn too little to compare.
    useful = max(MIN_USEFUL_EPOCHS, math.ceil(MIN_USEFUL_STEPS / steps_per_epoch) if steps_per_epoch else 0)
    epochs = fits // FULL_TRIALS if fits >= FULL_TRIALS * useful else fits
    epochs = max(1, min(max_epochs, epochs))
    if refit:  # the refit reserved above trains as long as the longest trial: no longer trials than it covers
        epochs = min(epochs, epochs_fit)
    chosen = "hyperband" if pruner == "median" and epochs >= HYPERBAND_FROM_EPOCHS else pruner
    return BudgetPlan(
        timeout=timeout,
        spent=spent,
        wrap_up=wrap_up,
        search=search,
        epoch_seconds=epoch,
        max_epochs=epochs,
        pruner=chosen,
        expected_trials=max(1, int(search // (epoch * (epochs + 1.5) / 2))),
        epoch_mode=epoch_mode,
        validation_seconds=validation,
    )


def _in_rounds(
    timeout: float,
    spent: float,
    wrap_up: float,
    search: float,
    epoch: float,
    validation: float,
    epoch_mode: str,
    measured: Probe,
    profile: DataProfile,
    smallest_round: int,
    *,
    max_epochs: int,
    pruner: str,
) -> BudgetPlan:
    """The plan when the search time holds fewer than MIN_USEFUL_EPOCHS passes over train: ROUNDS rounds of N
    examples (each validated) fill it, or fewer rounds when a round would hold less than ``smallest_round``
    examples; none fits: one sentence saying what would. ``epoch`` is a pass plus ``validation``, with the margin."""
    per_example = (epoch - validation) / max(profile.train, 1)  # one training example, with the margin
    for rounds in range(min(ROUNDS, max_epochs), 0, -1):
        examples = int((search / rounds - validation) // max(per_example, 1e-9))
        if examples >= min(smallest_round, profile.train):
            round_seconds = validation + per_example * min(examples, profile.train)
            head_pass = EPOCH_SAFETY * (measured.epoch_seconds_head or math.inf)  # no feature cache: a bound
            return BudgetPlan(
                timeout=timeout, spent=spent, wrap_up=wrap_up, search=search, epoch_seconds=round_seconds,
                max_epochs=rounds, pruner=pruner, expected_trials=1, epoch_mode=epoch_mode,
                epoch_examples=examples if examples < profile.train else 0, head_passes=ROUNDS * head_pass <= search,
                validation_seconds=validation,
            )  # fmt: skip
    need = math.ceil(spent + wrap_up + ROUNDS * (validation + per_example * min(smallest_round, profile.train)))
    raise AutoftError(
        f"--timeout {timeout:g}s is too short: preparing and probing took {spent:.0f}s, the final test score "
        f"and report need about {wrap_up:.0f}s, and validating once about {validation:.0f}s; give at least "
        f"--timeout {need}s."
    )


def _costliest(measured: Probe, modes: Collection[str]) -> tuple[str, float]:
    """The freeze mode family with the most expensive measured epoch among ``modes`` and that epoch's seconds; a
    head-only epoch is the floor (a linear probe's own cost; the others' steps include its forward pass)."""
    costs = {}
    for mode in (*(modes or ("full",)), "linear_probe"):
        family = cost_family(mode)
        if family not in ("full", "head") and measured.mode(family) is None:
            family = "full"  # not measured (never costlier than full, or unknown): counted as full fine-tuning
        costs[family] = measured.epoch_seconds(mode) or 0.0
    family = max(costs, key=costs.__getitem__)
    return family, costs[family]


@dataclass(frozen=True)
class Budget:
    """The plan's limits as wall-clock readings (``time.time()``: the same in every process of the machine, and
    across machines whose clocks are synchronized), so a Ray worker applies the same rule as the driver.

    >>> budget = Budget(search_end=time.time() + 60, epoch_seconds=10)
    >>> budget.next_epoch_fits(last_epoch_seconds=5), budget.next_epoch_fits(last_epoch_seconds=70)
    (True, False)
    """

    search_end: float  # every trial has ended by then; the wrap-up (test score, report) has the rest
    epoch_seconds: float  # one full fine-tuning epoch as the plan counts it (with its margin)
    validation_seconds: float = 0.0  # one val evaluation as the plan counts it
    finish_allowance: float = 0.0  # a trial left with at most these seconds to run is not pruned (CHEAP_FINISH)

    @classmethod
    def from_plan(cls, plan: BudgetPlan, *, started: float) -> Budget:
        """The budget of a plan made by a command that started at wall-clock time ``started``."""
        end = started + plan.spent + plan.search
        return cls(
            search_end=end,
            epoch_seconds=plan.epoch_seconds,
            validation_seconds=plan.validation_seconds,
            finish_allowance=CHEAP_FINISH * plan.search,
        )

    @property
    def trial_deadline(self) -> float:
        """When a trial's training must end (mid-epoch if need be) so that validating it ends by ``search_end``."""
        return self.search_end - self.validation_seconds

    def launch_window(self) -> float:
        """Seconds from now in which a new trial may start: one epoch must still fit after it (at least 1 ms)."""
        return max(1e-3, self.search_end - self.epoch_seconds - time.time())

    def is_last(self, epochs: int) -> bool:
        """Whether a trial of ``epochs`` epochs (as long as the plan counts them) starting now is the search's last:
        after it, no other could start (:meth:`launch_window` wants one epoch left)."""
        return time.time() + (epochs + 1) * self.epoch_seconds > self.search_end

    def next_epoch_fits(self, last_epoch_seconds: float) -> bool:
        """Whether one more epoch, as long as the plan's or as the trial's own last one if that was slower, ends
        before the search must: a trial for which it does not is stopped by the budget, and keeps its best epoch."""
        return time.time() + max(self.epoch_seconds, last_epoch_seconds) <= self.search_end

    def last_part_fits(self, last_epoch_seconds: float) -> bool:
        """Whether a LAST_PART share of one more epoch (as long as in :meth:`next_epoch_fits`) and its validation
        still end before the search must: the trial then trains on until :attr:`trial_deadline` and validates."""
        longest = max(self.epoch_seconds, last_epoch_seconds)
        return time.time() + LAST_PART * longest + self.validation_seconds <= self.search_end
