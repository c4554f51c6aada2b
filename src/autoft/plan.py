"""Look before searching: measure the data and the model, shape the space with priors, plan the time budget.

Before the first trial the controller builds a :class:`Plan` (docs/controller.md):

1. :func:`~autoft.probe.profile_data` -- examples, classes, imbalance, resolution (counts only; nothing is
   trained).
2. :func:`~autoft.probe.probe` -- only what a decision below uses: a linear probe on the pooled pretrained
   features of a bounded sample (priors on), the measured cost of one epoch (full fine-tuning, each other freeze
   mode family the space offers -- partial, LoRA, BitFit, norm --, head-only training, evaluation; ``--timeout``
   only).
3. :func:`~autoft.priors.choose_priors` -- small named rules, each with a threshold and a reason, that narrow
   the search space (never widen it; never a knob the user set with ``--set``/``--fix``; never a user's own
   space file).
4. :func:`~autoft.budget.plan_budget` -- with ``--timeout``: reserve the wrap-up (test score, report) and what
   the preparation and probe already spent, then fit the epochs per trial, the pruner and the expected trial
   count to what is left, counting each epoch at the cost of the most expensive freeze mode the space offers
   (a space of parameter-efficient modes only is planned at their own, lower, cost).

The plan is the one place that sets the trials' ``max_epochs`` and the pruner; the controller applies both once.

A resumed search reuses the stored probe (study user attr ``plan``), so it shapes the same space; what the first
run skipped is measured when a later run needs it. A new search on data mapped from the decoded-data cache reuses
the probe kept beside the cache entry (:mod:`autoft.probe_cache`) when its data, model, seed and device match.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoft.budget import EPOCH_SAFETY, BudgetPlan, plan_budget, wrap_up_fixed_seconds
from autoft.preparation import Setup
from autoft.priors import Prior, apply_priors, choose_priors, fit_settles_priors
from autoft.probe import DataProfile, Probe, probe, profile_data
from autoft.probe_cache import Slot
from autoft.recipe import Recipe
from autoft.space import SearchSpace, Space
from autoft.step_cost import cost_family

__all__ = ["Plan", "make_plan", "stored"]


@dataclass(frozen=True)
class Plan:
    """Everything measured and decided before the first trial; ``describe()`` is what ``--explain`` prints."""

    data: DataProfile
    probe: Probe
    max_epochs: int  # per trial: --max-epochs, or what the --timeout budget fits
    pruner: str  # --pruner, or the budget's choice for the trial length it fits
    priors: tuple[Prior, ...] = ()
    skipped: tuple[str, ...] = ()
    budget: BudgetPlan | None = None
    priors_off: str = ""  # why no prior applies ("--no-priors", "your own space file", ...)
    reused: bool = False  # the probe came from the study (a resumed search)
    cached_from: str = ""  # when the probe kept in the data cache was measured ('' : not from there)
    steps_per_epoch: Mapping[int, int] = dataclasses.field(default_factory=dict)  # batch size -> optimizer steps
    left_out: str = ""  # the portfolio's head-only recipes left out of a one-trial budget, and why ('' : none)
    # ... their freeze modes: this run does not queue those recipes, the study still records them (the same study
    # resumed with a larger budget runs them)
    held_back: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """Plain data for the study's user attr ``plan``: the measurements (a resumed search reuses them), the
        priors that fired and the budget plan of the latest run."""
        return {
            "data": dataclasses.asdict(self.data),
            "probe": dataclasses.asdict(self.probe),
            "priors": [prior.name for prior in self.priors],
            "budget": dataclasses.asdict(self.budget) if self.budget is not None else None,
        }

    def describe(self) -> str:
        """The plan in plain lines: the data, the probe, each prior with its reason, the budget."""
        d, p = self.data, self.probe
        lines = [
            f"data: {d.train} train / {d.val} val / {d.test} test {'images' if d.image_size else 'examples'}, "
            f"{d.classes} classes ({d.smallest_class}-{d.largest_class} per class, imbalance {d.imbalance:.1f}x)"
            + (f", {d.image_size} px" if d.image_size else "")
            + (f"; {d.inputs}" if d.inputs else ""),
            f"probe{_probe_source(self)}: {_probe_text(p)}; probe took {p.seconds:.1f}s",
            *_modes_text(p),
        ]
        if self.priors_off:
            lines.append(f"priors: off ({self.priors_off})")
        elif not self.priors:
            lines.append("priors: none apply (no threshold crossed); the space is searched as given")
        for prior in self.priors:
            edits = ", ".join(f"{k} {_edit_text(v)}" for k, v in prior.edits.items())
            lines.append(f"prior {prior.name} ({prior.because}): {edits} -- {prior.reason}")
        lines += [f"  skipped: {note}" for note in self.skipped]
        b = self.budget
        if self.steps_per_epoch:
            steps = ", ".join(f"{n} at batch {size}" for size, n in sorted(self.steps_per_epoch.items()))
            rounds = f" of {b.epoch_examples} examples (a pass does not fit)" if b and b.epoch_examples else ""
            lines.append(
                f"updates: {self.max_epochs} epoch(s){rounds} per trial at most; optimizer steps per epoch: {steps}"
            )
        if self.left_out:
            lines.append(f"portfolio: {self.left_out}")
        if b is None:
            lines.append("budget: none (no --timeout): --trials and --max-epochs as given")
        else:
            lines.append(
                f"budget: {b.timeout:.0f}s = {b.spent:.1f}s spent (preparation, probe) + {b.search:.1f}s search + "
                f"{b.wrap_up:.1f}s wrap-up (test score, report); epoch ~{b.epoch_seconds:.1f}s "
                f"({_epoch_words(b.epoch_mode)}, x{EPOCH_SAFETY} margin) -> up to {b.max_epochs} epoch(s) per trial, "
                f"pruner {b.pruner}, "
                f"about {b.expected_trials} trials; no trial starts in the last {b.epoch_seconds:.1f}s"
            )
        return "\n".join(lines)


def _probe_source(plan: Plan) -> str:
    if plan.reused:
        return " (stored, from the first run)"
    return f" (cached, from {plan.cached_from})" if plan.cached_from else ""


def _probe_text(p: Probe) -> str:
    """What the probe measured, and what it skipped because no decision needed it."""
    linear = (
        f"linear probe val accuracy {p.linear_probe_accuracy:.3f} "
        f"({f'{p.examples} sampled examples, ' if p.examples else 'no pooled features, '}"
        f"chance {p.chance:.3f}, fit {p.fit:.2f})"
        if p.linear_probe_accuracy is not None
        else "linear probe skipped (priors off)"
    )
    costs = (
        f"one epoch: full fine-tuning ~{p.epoch_seconds_full:.1f}s, head only <= {p.epoch_seconds_head:.2f}s"
        if p.has_costs
        else "epoch cost not measured (no --timeout)"
    )
    return f"{linear}; {costs}"


def _modes_text(p: Probe) -> list[str]:
    """One line per timed freeze mode family: what trains, the step time and peak memory against full fine-tuning."""
    full = p.mode("full")
    if full is None or len(p.modes) < 2:
        return []
    cuda = full.peak_bytes is not None
    lines = [f"freeze mode costs, a few timed steps each on a model copy{'' if cuda else ' (peak memory: CUDA only)'}:"]
    for c in sorted(p.modes, key=lambda c: c.mode != "full"):
        share = 100 * c.trainable / max(1, c.parameters)
        peak = c.peak_bytes or 0
        lines.append(
            f"  {c.mode}: {c.timed}: {c.trainable:,} trainable parameters ({share:.3g}% of {c.parameters:,}), "
            f"step {1e3 * c.seconds_per_example:.2f} ms per example "
            f"({c.seconds_per_example / max(1e-12, full.seconds_per_example):.2f}x full)"
            + (f", peak memory {peak / 2**30:.2f} GiB ({peak / max(1, full.peak_bytes or 1):.2f}x full)" * cuda)
        )
    return lines


def _epoch_words(family: str) -> str:
    if family == "full":
        return "full fine-tuning"
    return "head only" if family == "head" else f"{family}, the costliest freeze mode offered"


def _edit_text(edit: Mapping[str, Any]) -> str:
    if "choices" in edit:
        return "in {" + ", ".join(map(str, edit["choices"])) + "}"
    return " ".join(f"{'<=' if k == 'high' else '>='} {v:g}" for k, v in edit.items())


def _longest_trial(space: Space) -> int:
    """The most epochs the space lets a trial train (a large number when a function decides)."""
    epochs = next((p for p in getattr(space, "params", ()) if p.name == "epochs"), None)
    if epochs is None:
        return 10**6 if not isinstance(space, SearchSpace) else Recipe.__dataclass_fields__["epochs"].default
    return int(epochs.value if epochs.kind == "fixed" else epochs.high if epochs.kind == "int" else 10**6)


def stored(attrs: Mapping[str, Any]) -> tuple[DataProfile, Probe] | None:
    """The profile and probe a previous run of this study recorded (None for a new study)."""
    record = attrs.get("plan")
    if not isinstance(record, dict):
        return None
    try:
        return DataProfile(**record["data"]), Probe(**record["probe"])
    except (KeyError, TypeError):  # written by another version: measure again
        return None


def make_plan(
    setup: Setup,
    space: Space,
    study_attrs: Mapping[str, Any],
    *,
    seed: int,
    timeout: float | None,
    spent: Callable[[], float],
    max_epochs: int,
    pruner: str,
    priors_off: str = "",
    keep: Sequence[str] = (),
    final_model: Mapping[str, Any] | None = None,
    kept: Slot | None = None,
) -> tuple[Plan, Space]:
    """Measure (or reuse the stored measurements), choose priors, plan the budget; return the plan and the space.

    ``final_model`` holds :func:`plan_budget`'s ``soup_models`` / ``refit``: the final model's share of the wrap-up.
    ``spent()`` gives the seconds the command has run so far (read after the probe, so the probe counts).
    ``priors_off`` says why priors are off ('' applies them); ``keep`` names the knobs the user set. ``kept``: where
    a new study's probe is looked up and kept (:mod:`autoft.probe_cache`; None: nowhere).
    """
    final_model = dict(final_model or {})
    reuse = stored(study_attrs)
    priors: tuple[Prior, ...] = ()
    skipped: tuple[str, ...] = ()
    if not priors_off and not isinstance(space, SearchSpace):
        priors_off = "a space(trial) function is searched as written"
    # Measure only what a decision uses: the linear probe for the priors, the epoch costs for a budget.
    profile = reuse[0] if reuse is not None else profile_data(setup.dataset)
    previous = reuse[1] if reuse is not None else None
    cached = kept.load() if kept is not None and reuse is None else None
    previous = cached[0] if cached is not None else previous
    allowance = None if timeout is None else Allowance(PROBE_SHARE * (timeout - spent()))
    measured = probe(
        setup, seed=seed, linear_probe=not priors_off, costs=timeout is not None, previous=previous,
        modes=_cost_recipes(space), settled=fit_settles_priors, affordable=allowance and allowance.grant,
    )  # fmt: skip
    if kept is not None and reuse is None and (cached is None or measured is not cached[0]):
        kept.save(measured)  # measured now (all of it, or what the kept one lacked)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cached[1])) if cached is not None else ""
    if not priors_off:
        priors = choose_priors(profile, measured)
        space, skipped = apply_priors(space, priors, keep=keep)
    budget, epochs = None, max_epochs
    steps = _steps_per_epoch(space, profile.train)
    if timeout is not None:
        longest = min(max_epochs, _longest_trial(space))
        budget = plan_budget(
            timeout, measured, profile, spent=spent(), max_epochs=longest, pruner=pruner,
            steps_per_epoch=min(steps.values(), default=None), modes=_freeze_modes(space),
            smallest_round=max(steps, default=1), wrap_up_fixed=wrap_up_fixed_seconds(), **final_model,
        )  # fmt: skip
        epochs, pruner = budget.max_epochs, budget.pruner
        # A linear probe's passes cost little (a frozen forward, or none on cached features): kept whole when they fit.
        whole = ("linear_probe",) if budget.head_passes else ()
        space = space.with_max_epochs(epochs, epoch_examples=budget.epoch_examples, whole_passes=whole)
        if budget.epoch_examples:
            steps = {b: math.ceil(budget.epoch_examples / b) for b in steps}
    held_back, left_out = ((), "") if budget is None or priors_off else _one_fine_tune(space, budget, measured, priors)
    plan = Plan(
        profile, measured, epochs, pruner, priors, skipped, budget, priors_off=priors_off, reused=reuse is not None,
        steps_per_epoch=steps, cached_from=when, left_out=left_out, held_back=held_back,
    )  # fmt: skip
    return plan, space


# The probe's optional measurements together take at most this share of the time a budget has left when the probe
# starts (an :class:`Allowance`): the look before searching stays a few seconds of a short budget (issue 14).
# They are, in the order asked: the linear probe's second sample (the rest of its 1,024 / 512 examples; on the
# demo, digits at 48 px on 2 cores, ~3.8 s: without it the first sample's fit decides, 0.76-0.79 against
# 0.87-0.88 on all, biased low, so "features-fit-well" fires less, never more), the evaluation timing (~0.45 s:
# without it the pooled pass's pace, start-up included, is the bound) and each step timing at the trials' own
# batch (~1.2 s: without it the small batch's pace, which overestimates a batch-64 step's per example: fewer
# epochs planned, never more than fit, and the last fine-tune fits its steps to the time left anyway).
PROBE_SHARE = 0.05


@dataclass
class Allowance:
    """Seconds the probe's optional measurements may still take: each one granted is deducted (its predicted
    seconds), each one that does not fit is refused and left out.

    >>> allowance = Allowance(1.0)
    >>> allowance.grant(3.8), allowance.grant(0.45), allowance.grant(0.6), allowance.seconds
    (False, True, False, 0.55)
    """

    seconds: float

    def grant(self, seconds: float) -> bool:
        if seconds > self.seconds:
            return False
        self.seconds -= seconds
        return True


# A budget that fits one trial: the portfolio's head-only recipes run first only while they cost at most this
# share of the search. The one fine-tune that follows them fills the time left (stretch.StepFit), so a linear
# probe costs it that many steps: on MiniLM-L6 NER at 3 minutes the probe trial took 18 s of 153 s (~45 of ~370
# updates) and scored val F1 0.24 against the fine-tune's 0.26-0.45; on images with the feature cache it is ~1 %.
HEAD_TRIAL_SHARE = 0.05


def _one_fine_tune(
    space: Space, budget: BudgetPlan, measured: Probe, priors: Sequence[Prior]
) -> tuple[tuple[str, ...], str]:
    """The freeze modes of the portfolio's head-only recipes this run holds back, and the plan's line saying why,
    when the budget fits one trial and a head-only trial would take more than HEAD_TRIAL_SHARE of the search (its
    measured pass: ``epoch_seconds_head``); none otherwise. None either when ``features-fit-well`` fired: then the
    linear probe is a contender (priors put it first), not only a fallback. The space keeps them: the study records
    its whole portfolio, so the same study resumed with a budget that fits more trials runs them.

    >>> _one_fine_tune(load_space("text"), one_trial_budget, measured, ())[1]  # doctest: +SKIP
    'linear_probe left out: one trial fits the 153s search and a head-only trial would take ~14s of it ...'
    """
    if not isinstance(space, SearchSpace) or budget.expected_trials > 1 or measured.epoch_seconds_head is None:
        return (), ""
    if any(prior.name == "features-fit-well" for prior in priors):
        return (), ""
    head = tuple(entry for entry in space.portfolio if cost_family(str(entry.get("freeze"))) == "head")
    if not head or len(head) == len(space.portfolio) or measured.epoch_seconds_head <= HEAD_TRIAL_SHARE * budget.search:
        return (), ""
    names = tuple(sorted({str(entry["freeze"]) for entry in head}))
    why = (
        f"{', '.join(names)} left out: one trial fits the {budget.search:.0f}s search and a head-only trial would take "
        f"~{measured.epoch_seconds_head:.0f}s of it (> {HEAD_TRIAL_SHARE:.0%}); the first fine-tune takes it all"
    )
    return names, why


def _steps_per_epoch(space: Space, train: int) -> dict[int, int]:
    """Optimizer steps one epoch takes at each batch size the space may choose (the plan says how many updates
    a trial gets, not only how many epochs); empty when a space function decides the batch."""
    params = {p.name: p for p in getattr(space, "params", ())}
    batch = params.get("batch_size")
    if batch is None and isinstance(space, SearchSpace):
        sizes: tuple = (Recipe.__dataclass_fields__["batch_size"].default,)
    elif batch is None:
        return {}
    else:
        sizes = batch.choices if batch.kind == "categorical" else (batch.value,) if batch.kind == "fixed" else ()
    return {int(b): math.ceil(train / int(b)) for b in sizes if isinstance(b, int) and b > 0}


def _freeze_modes(space: Space) -> tuple[str, ...]:
    """The freeze modes the space offers; () for a space function (unknown: the budget counts full fine-tuning)."""
    if not isinstance(space, SearchSpace):
        return ()
    return tuple(map(str, space.offered("freeze"))) or (Recipe().freeze,)


def _cost_recipes(space: Space) -> tuple[Recipe, ...]:
    """One recipe per freeze mode family the space offers whose steps cost other than full fine-tuning's: the
    family's most expensive there (partial: the most block groups; LoRA: the largest rank, attention+mlp when
    offered, biases too when lora_bias is). The probe times each once. Partial is left out when full fine-tuning
    is offered: the same forward pass and a part of its backward can never cost more, so timing it changes no
    plan (the parameter-efficient modes are timed anyway: LoRA adds work, and --explain shows what each costs).

    >>> [r.freeze for r in _cost_recipes(load_space("full"))]  # doctest: +SKIP
    ['lora_bias', 'bitfit', 'norm']
    """
    if not isinstance(space, SearchSpace):
        return ()
    modes = _freeze_modes(space)
    families = {cost_family(mode) for mode in modes}

    def largest(name: str) -> int:
        return int(max(space.offered(name), default=Recipe.__dataclass_fields__[name].default))

    partial = "partial" in families and "full" not in families
    recipes = [Recipe(freeze="partial", train_blocks=largest("train_blocks"))] if partial else []
    if "lora" in families:
        targets = space.offered("lora_targets") or (Recipe().lora_targets,)
        recipes.append(
            Recipe(
                freeze="lora_bias" if "lora_bias" in modes else "lora",
                lora_rank=largest("lora_rank"),
                lora_targets="attention+mlp" if "attention+mlp" in targets else str(targets[0]),
                lora_modules=str(next(iter(space.offered("lora_modules")), "")),
            )
        )
    return (*recipes, *(Recipe(freeze=family) for family in ("bitfit", "norm") if family in families))
