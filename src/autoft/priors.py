"""Look before searching, part two: small named rules that narrow a bundled preset from what the probe measured.

A rule never widens the space, never edits a knob the user set with ``--set``/``--fix``, and never a user's own
space file. docs/controller.md gives each rule's evidence, and the rules tried and removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoft.probe import DataProfile, Probe
from autoft.recipe import PEFT_MODES
from autoft.space import Param, SearchSpace

__all__ = ["STRONG_FIT", "Prior", "apply_priors", "choose_priors", "fit_settles_priors"]


@dataclass(frozen=True)
class Prior:
    """One rule that fired: its name, the measurement against its threshold, why, and the edits it made.

    ``edits`` maps a parameter to the narrowed spec: ``{"choices": [...]}`` or ``{"low": x}``/``{"high": x}``;
    ``first`` names portfolio recipes (by freeze mode) moved to the front.
    """

    name: str
    because: str  # the measurement and the threshold, e.g. "linear probe fit 0.97 >= 0.95"
    reason: str  # one line: why this edit helps, with the source
    edits: Mapping[str, Mapping[str, Any]]
    first: tuple[str, ...] = ()


# The threshold, named once (docs/controller.md gives the evidence). Two more rules were tried and removed because
# benchmarks/quality.py did not support them (docs/controller.md, "Rules tried and removed"): "features-fit-poorly"
# (fit < 0.5: no linear probe, lr >= 1e-4) and "few-images" (< 20 per class: epochs <= 6, weight decay >= 1e-4).
STRONG_FIT = 0.95  # linear-probe fit from which the pretrained features already separate the classes
# A fit this far below STRONG_FIT on the probe's first, small sample (probe.FIRST_TRAIN_EXAMPLES) settles the
# fit rule: a small sample's fit is biased low (docs/benchmarks.md: 0.76-0.79 on 249 digits against 0.87-0.88 on
# all 1,077), but not by 0.25, so the whole sample could not reach the threshold either.
SMALL_SAMPLE_MARGIN = 0.25
# Optimizer steps an epoch should have at least: on a small training split a large batch leaves a trial a few
# dozen updates (issue 14: 600 images at batch 64 for 3 epochs = ~30 steps lost 9 points to batch 32 for 10
# epochs), and on a CPU or a busy GPU a smaller batch costs about the same time per example: more updates
# for the same time. The largest batch any preset offers is 128, so the rule fires below 16 x 128 examples.
MIN_STEPS_PER_EPOCH = 16
LARGEST_PRESET_BATCH = 128


def fit_settles_priors(fit: float) -> bool:
    """Whether a fit measured on the probe's first, small sample already decides every rule that reads the fit.

    >>> fit_settles_priors(0.47), fit_settles_priors(0.85)
    (True, False)
    """
    return fit < STRONG_FIT - SMALL_SAMPLE_MARGIN


def choose_priors(profile: DataProfile, measured: Probe) -> tuple[Prior, ...]:
    """The rules whose thresholds the measurements cross, in order (later rules narrow further).

    From ``profile``: the batch sizes that give an epoch at least ``MIN_STEPS_PER_EPOCH`` optimizer steps
    ("few-steps-per-epoch"); the other data rule tried ("few-images") did not survive the benchmark.

    >>> [p.name for p in choose_priors(profile, dataclasses.replace(measured, linear_probe_accuracy=0.99))]
    ... # doctest: +SKIP
    ['features-fit-well']
    """
    fit = measured.fit
    rules: list[Prior] = []
    if fit >= STRONG_FIT:
        rules.append(
            Prior(
                "features-fit-well",
                f"linear probe fit {fit:.2f} >= {STRONG_FIT}",
                "features already separate the classes: keep them (linear probe, LP-FT, shallow partial tuning; "
                "Kumar et al. 2022 LP-FT; the parameter-efficient modes change them little too) and use lower "
                "rates (Li et al. 2020: similar domains want smaller lr)",
                {"freeze": {"choices": ["linear_probe", "lp_ft", "partial", *PEFT_MODES]}, "lr": {"high": 1e-3}},
                first=("linear_probe", "lp_ft"),
            )
        )
    if profile.train < MIN_STEPS_PER_EPOCH * LARGEST_PRESET_BATCH:
        largest = max(1, profile.train // MIN_STEPS_PER_EPOCH)
        rules.append(
            Prior(
                "few-steps-per-epoch",
                f"{profile.train} training examples / {MIN_STEPS_PER_EPOCH} steps per epoch = batch <= {largest}",
                "a small training split needs small batches for enough optimizer updates in the same time "
                "(the smallest offered batch stays when none is that small)",
                {"batch_size": {"high": largest}},
            )
        )
    return tuple(rules)


def apply_priors(
    space: SearchSpace, priors: Sequence[Prior], *, keep: Sequence[str] = ()
) -> tuple[SearchSpace, tuple[str, ...]]:
    """The space with each prior's edits applied, and a note for every edit skipped.

    An edit only narrows: choices are intersected (order kept), a bound moves inwards. It is skipped when the
    parameter is in ``keep`` (the user's ``--set``/``--fix``), fixed, missing, or would be left empty.

    >>> narrowed, skipped = apply_priors(load_space("default"), priors)  # doctest: +SKIP
    """
    skipped: list[str] = []
    for prior in priors:
        for name, edit in prior.edits.items():
            param = next((p for p in space.params if p.name == name), None)
            narrowed = (
                "set by the user" if name in keep else "not searched" if param is None else _narrowed(param, edit)
            )
            if isinstance(narrowed, str):
                skipped.append(f"{prior.name}: {name} left as is ({narrowed})")
                continue
            params = _conditions_within([narrowed if p.name == name else p for p in space.params])
            portfolio = _portfolio_within(params, space.portfolio)
            space = dataclasses.replace(space, params=params, portfolio=portfolio)
        space = _portfolio_first(space, prior.first, keep)
    return space, tuple(skipped)


def _narrowed(param: Param, edit: Mapping[str, Any]) -> Param | str:
    """The parameter narrowed by ``edit``, or why not (it already lies within, or nothing would be left)."""
    if param.kind == "categorical" and "choices" in edit:
        choices = tuple(c for c in param.choices if c in edit["choices"])  # the space's order
        if not choices or choices == param.choices:
            return "nothing would be left" if not choices else "already within"
        return dataclasses.replace(param, choices=choices)
    if param.kind == "categorical" and "high" in edit and all(_is_number(c) for c in param.choices):
        choices = tuple(c for c in param.choices if c <= edit["high"]) or (min(param.choices),)  # the nearest stays
        return "already within" if choices == param.choices else dataclasses.replace(param, choices=choices)
    if param.kind in ("float", "int") and ("low" in edit or "high" in edit):
        low = max(param.low, edit.get("low", param.low))
        high = min(param.high, edit.get("high", param.high))
        if low > high or (low, high) == (param.low, param.high):
            return "nothing would be left" if low > high else "already within"
        return dataclasses.replace(param, low=type(param.low)(low), high=type(param.high)(high))
    return "not a searched range or choice"


def _portfolio_first(space: SearchSpace, freeze_modes: Sequence[str], keep: Sequence[str]) -> SearchSpace:
    if not freeze_modes or "freeze" in keep:
        return space
    rank = {mode: i for i, mode in enumerate(freeze_modes)}
    ordered = sorted(space.portfolio, key=lambda entry: rank.get(entry.get("freeze"), len(rank)))
    return dataclasses.replace(space, portfolio=tuple(ordered))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nearest_choice(param: Param, value: Any) -> Any:
    """A number no longer offered by a numeric choice becomes the largest offered below it (else the smallest):
    a portfolio recipe at batch 64 runs at batch 32 once the data is too small for 64, instead of dropping out."""
    if param.kind != "categorical" or value in param.choices or not _is_number(value):
        return value
    if not all(_is_number(c) for c in param.choices):
        return value
    below = [c for c in param.choices if c <= value]
    return max(below) if below else min(param.choices)


def _conditions_within(params: Sequence[Param]) -> tuple[Param, ...]:
    """Conditions follow a narrowed choice: values no longer offered leave ``when``; a parameter whose condition
    can no longer hold is dropped (e.g. ``train_blocks`` once ``partial`` is gone)."""
    kept: dict[str, Param] = {}
    for p in params:
        when = {}
        for other, allowed in p.when.items():
            source = kept.get(other)
            offered = source.choices if source is not None and source.kind == "categorical" else allowed
            when[other] = tuple(
                v for v in allowed if source is not None and (v in offered or source.kind != "categorical")
            )
        if all(when.values()):
            kept[p.name] = dataclasses.replace(p, when=when)
    return tuple(kept.values())


def _portfolio_within(params: Sequence[Param], portfolio: Sequence[Mapping[str, Any]]) -> tuple[dict, ...]:
    """Portfolio entries the narrowed space still allows: entries with a choice no longer offered go (a number
    among numeric choices moves to the nearest offered one instead), numbers are clipped into the new ranges, and
    knobs the space dropped are left out."""
    by_name = {p.name: p for p in params}
    kept = []
    for entry in portfolio:
        values = {k: _nearest_choice(by_name[k], v) for k, v in entry.items() if k in by_name}
        if any(by_name[k].kind == "categorical" and v not in by_name[k].choices for k, v in values.items()):
            continue
        for k, v in values.items():
            if by_name[k].kind in ("float", "int"):
                values[k] = type(v)(min(max(v, by_name[k].low), by_name[k].high))
        kept.append(values)
    return tuple(kept)
