"""What a search optimizes: validation accuracy alone, or accuracy against the model's size or speed.

``--objective accuracy,params`` (or ``accuracy,latency``, or all three) makes the study multi-objective:
accuracy is maximized, the parameter count and the latency minimized. A search then keeps a Pareto front,
and ``best/`` is its knee (:func:`knee`).

Costs are measured on the model a trial trains (its architecture, with the head sized for the data):

- ``params``: the number of parameters (trainable or not: the whole model is deployed);
- ``latency``: milliseconds per image at batch 1 on the device the trial ran on, in eval mode under
  ``torch.inference_mode``: 3 warm-up passes, then the median of 10 timed passes (CUDA synchronized around
  each). It depends only on the architecture, the input size and the device, so it is measured once per
  process for each of them and reused, which also keeps timing noise from splitting one model into many points.

Optuna cannot prune multi-objective trials (``Trial.report`` raises), so :class:`EpochReports` applies the
study's own pruner to the accuracy curves through a single-objective shadow study kept in memory.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from autoft.config import OBJECTIVES, parse_objectives
from autoft.tasks.base import ModelInputs

__all__ = [
    "KNEE_RULE",
    "OBJECTIVES",
    "EpochReports",
    "ParetoPoint",
    "costs",
    "directions",
    "knee",
    "pareto_front",
    "parse_objectives",
    "study_objectives",
    "trial_values",
]


KNEE_RULE = (
    "the knee of the front: each objective scaled to 0..1 over the front (1 = best), the point farthest "
    "beyond the line (plane) through the extremes, i.e. the largest sum of scaled objectives; "
    "with 1-2 points, the most accurate"
)
_WARMUP, _RUNS = 3, 10
_latency_cache: dict[tuple, float] = {}  # (architecture, input size, device) -> ms per image, this process


def directions(names: Sequence[str]) -> list[str]:
    """Optuna's study directions for the objectives, in order."""
    return [OBJECTIVES[n].direction for n in names]


def study_objectives(study: optuna.Study) -> tuple[str, ...]:
    """The objectives a study was opened with (saved as its user attr ``objectives``; accuracy for older ones)."""
    return tuple(study.user_attrs.get("objectives", ("accuracy",)))


def _architecture(model: nn.Module) -> tuple:
    return type(model).__qualname__, sum(p.numel() for p in model.parameters()), repr(model)[:2000]


def _latency_ms(model: nn.Module, example: ModelInputs) -> float:
    """Median milliseconds of one forward pass at batch 1 (a copy of the model, so the shared one never moves)."""
    device = _device_of(example)
    key = (*_architecture(model), _shape_of(example), str(device))
    if key not in _latency_cache:
        net = copy.deepcopy(model).to(device).eval()
        timings = []
        with torch.inference_mode():
            for run in range(_WARMUP + _RUNS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # time the kernels, not their launch
                start = time.perf_counter()
                net(example)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if run >= _WARMUP:
                    timings.append((time.perf_counter() - start) * 1000)
        _latency_cache[key] = statistics.median(timings)
        del net
    return _latency_cache[key]


def _device_of(example: ModelInputs) -> torch.device:
    tensor = example if isinstance(example, torch.Tensor) else next(iter(example.values()))
    return tensor.device


def _shape_of(example: ModelInputs) -> tuple:
    if isinstance(example, torch.Tensor):
        return tuple(example.shape)
    return tuple(sorted((k, tuple(v.shape)) for k, v in example.items()))


def costs(model: nn.Module, names: Sequence[str], *, example: ModelInputs) -> dict[str, float]:
    """The cost objectives of a trial's model, keyed by their user attr (``params``, ``latency_ms``).

    ``example``: one model input (batch 1) on the device to time on, as the task makes it.

    >>> costs(model, ["accuracy", "params"], example=torch.zeros(1, 3, 16, 16))  # doctest: +SKIP
    {'params': 8730.0}
    """
    out: dict[str, float] = {}
    if "params" in names:
        out["params"] = float(sum(p.numel() for p in model.parameters()))
    if "latency" in names:
        out["latency_ms"] = round(_latency_ms(model, example), 4)
    return out


def trial_values(names: Sequence[str], best_score: float, notes: dict[str, Any]) -> float | list[float]:
    """What a backend tells Optuna for a COMPLETE trial: the accuracy, or one value per objective."""
    if len(names) == 1:
        return best_score
    return [best_score, *(float(notes[OBJECTIVES[n].attr]) for n in names[1:])]


class EpochReports:
    """Records a trial's validation accuracy per epoch and asks the study's pruner whether to stop it.

    One objective: ``trial.report`` and ``trial.should_prune`` as usual. Several: Optuna refuses both, so the
    curve goes to the trial's user attr ``val_accuracy`` (not its intermediate values: Optuna's TPE fails on a
    multi-objective study whose pruned trials have them) and the same pruner judges it in an in-memory
    single-objective shadow study that mirrors every finished trial's accuracy curve.

    ``finish_allowance``: a trial whose remaining epochs cost at most this many seconds is not stopped, whatever
    the pruner says (recorded as the user attr ``pruning_waived``, the first epoch it was waived at): stopping it
    frees too little of the budget to pay for the chance of losing the best trial (:data:`autoft.budget.
    CHEAP_FINISH`). 0: the pruner alone decides.
    """

    def __init__(self, study: optuna.Study, *, finish_allowance: float = 0.0):
        self.study = study
        self.finish_allowance = finish_allowance
        self.multi = len(study.directions) > 1
        self.curves: dict[int, list[float]] = {}
        self.shadow_ids: dict[int, int] = {}  # real trial number -> shadow trial id, while it runs
        self.mirrored: set[int] = set()  # real trials already in the shadow
        self.shadow = (
            optuna.create_study(direction="maximize", pruner=study.pruner, study_name=study.study_name)
            if self.multi
            else None
        )

    def report(self, trial: optuna.Trial, epoch: int, value: float, *, seconds_left: float = math.inf) -> bool:
        """Record ``value`` for ``epoch``; True when the pruner says the trial should stop and finishing it (its
        remaining epochs, ``seconds_left``) would cost more than the finish allowance."""
        if not self._pruner_stops(trial, epoch, value):
            return False
        if seconds_left > self.finish_allowance:
            return True
        if "pruning_waived" not in trial.user_attrs:
            trial.set_user_attr("pruning_waived", epoch)
        return False

    def _pruner_stops(self, trial: optuna.Trial, epoch: int, value: float) -> bool:
        if not self.multi:
            trial.report(value, epoch)
            return trial.should_prune()
        curve = self.curves.setdefault(trial.number, [])
        curve.append(value)
        trial.set_user_attr("val_accuracy", curve)
        self._mirror_finished()
        storage = self.shadow._storage
        if trial.number not in self.shadow_ids:
            self.shadow_ids[trial.number] = storage.create_new_trial(self.shadow._study_id)
            knobs = trial.user_attrs.get("knobs", {})  # the pruner reads the strategy (LP-FT) from them
            storage.set_trial_user_attr(self.shadow_ids[trial.number], "knobs", knobs)
        shadow_id = self.shadow_ids[trial.number]
        storage.set_trial_intermediate_value(shadow_id, epoch, value)
        return bool(self.study.pruner.prune(self.shadow, storage.get_trial(shadow_id)))  # some return numpy bools

    def _mirror_finished(self) -> None:
        """Bring the shadow up to date with the real study's finished trials (accuracy and curve only)."""
        storage, finished = self.shadow._storage, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        for t in self.study.get_trials(deepcopy=False, states=finished):
            if t.number in self.mirrored:
                continue
            self.mirrored.add(t.number)
            value = [t.values[0]] if t.state == TrialState.COMPLETE else None
            if t.number in self.shadow_ids:  # it ran here: close its shadow trial
                storage.set_trial_state_values(self.shadow_ids.pop(t.number), t.state, value)
            elif t.state != TrialState.FAIL:
                curve = t.user_attrs.get("val_accuracy") or [v for _, v in sorted(t.intermediate_values.items())]
                self.shadow.add_trial(
                    optuna.trial.create_trial(state=t.state, values=value, intermediate_values=dict(enumerate(curve)))
                )


@dataclass(frozen=True)
class ParetoPoint:
    """A trial on the Pareto front: its number and one value per objective (accuracy first)."""

    trial: int
    values: tuple[float, ...]


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    better_or_equal = all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True))
    return better_or_equal and any(s * x > s * y for x, y, s in zip(a, b, signs, strict=True))


def pareto_front(points: Sequence[ParetoPoint], names: Sequence[str]) -> list[ParetoPoint]:
    """The points no other point dominates, most accurate first (ties: lower trial number first).

    >>> front = pareto_front([ParetoPoint(0, (0.9, 10.0)), ParetoPoint(1, (0.8, 20.0))], ["accuracy", "params"])
    >>> [p.trial for p in front]
    [0]
    """
    signs = [1 if OBJECTIVES[n].direction == "maximize" else -1 for n in names]
    front = [p for p in points if not any(_dominates(q.values, p.values, signs) for q in points)]
    return sorted(front, key=lambda p: (-p.values[0], p.trial))


def knee(front: Sequence[ParetoPoint], names: Sequence[str]) -> ParetoPoint:
    """The front's knee (:data:`KNEE_RULE`): scale each objective to 0..1 over the front, 1 the best; take the
    largest sum (the farthest point beyond the line through the extremes); ties go to the more accurate.

    >>> knee([ParetoPoint(0, (0.95, 100.0)), ParetoPoint(1, (0.93, 20.0)), ParetoPoint(2, (0.5, 10.0))],
    ...      ["accuracy", "params"]).trial
    1
    """
    if not front:
        raise ValueError("knee() needs at least one point")
    by_accuracy = sorted(front, key=lambda p: (-p.values[0], p.trial))
    if len(front) <= 2:
        return by_accuracy[0]
    scaled_sum = {p.trial: 0.0 for p in front}
    for i, name in enumerate(names):
        column = [p.values[i] for p in front]
        low, high = min(column), max(column)
        if high == low:  # a constant objective says nothing about the trade-off
            continue
        for p in front:
            share = (p.values[i] - low) / (high - low)
            scaled_sum[p.trial] += share if OBJECTIVES[name].direction == "maximize" else 1.0 - share
    return max(by_accuracy, key=lambda p: scaled_sum[p.trial])  # max keeps the first (most accurate) of equals
