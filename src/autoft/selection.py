"""Model selection by successive halving: with several candidate models, drop the weak ones before the search.

Rung 1, a linear probe of every candidate: the head trains on the model's cached pooled features (one forward
pass over the data per model, then cheap epochs of a linear layer). The best half (``ceil(n / 2)``, at least
one) goes on, and so does every model within ``MARGIN`` of the best: a probe scored on a small validation
split is a noisy measurement, and a near tie is no reason to drop a model. Rung 2, only when more than two
candidates are left, is a short fine-tune of each survivor (``SHORT_EPOCHS`` epochs of the space's first
fine-tuning portfolio recipe), halved the same way. The search then chooses among the survivors only (the
``model`` knob, :func:`with_models`).

The decisions are pure functions of the measured scores (:func:`survivors`, :func:`run_rungs`); the
controller passes in what measures. The record lives in the study (user attr ``model_selection``), so a
resumed search reuses it instead of measuring again and perhaps deciding differently.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.space import SearchSpace, Space, TrialLike

__all__ = [
    "MARGIN",
    "ModelChoice",
    "Rung",
    "Stage",
    "describe",
    "load_record",
    "probe_recipe",
    "run_rungs",
    "save_record",
    "short_finetune_recipe",
    "summary_line",
    "survivors",
    "with_models",
]

log = logging.getLogger(__name__)

MARGIN = 0.02  # validation accuracy: models this close to the best are kept whatever the halving says
SHORT_EPOCHS = 2  # rung 2's fine-tune length
PROBE_EPOCHS = 10  # rung 1's linear-probe length (cheap on cached features)
STUDY_ATTR = "model_selection"


def survivors(scores: Mapping[str, float], *, margin: float = MARGIN) -> tuple[str, ...]:
    """The models that go on: the best ``ceil(n / 2)`` (at least one) plus all within ``margin`` of the best.

    Ties rank in the order given; a non-finite score (a diverged measurement) ranks last. The result keeps
    the order given.

    >>> survivors({"a": 0.50, "b": 0.90, "c": 0.89, "d": 0.70}, margin=0.02)
    ('b', 'c')
    >>> survivors({"a": 0.33, "b": 0.95, "c": 0.94}, margin=0.02)
    ('b', 'c')
    """
    if not scores:
        raise AutoftError("Model selection needs at least one candidate model, but got none.")
    if not 0 <= margin < 1:
        raise AutoftError(f"The model-selection margin must lie in [0, 1), but got {margin=}.")
    score = {m: s if math.isfinite(s) else -math.inf for m, s in scores.items()}
    ranked = sorted(score, key=lambda m: -score[m])  # stable: ties keep the order given
    best = score[ranked[0]]
    kept = set(ranked[: max(1, math.ceil(len(score) / 2))])
    kept |= {m for m, s in score.items() if math.isfinite(best) and s >= best - margin}
    return tuple(m for m in scores if m in kept)


@dataclass(frozen=True)
class Stage:
    """One rung to run: ``measure(model)`` -> validation accuracy (None: interrupted); it runs only while
    more than ``runs_above`` candidates are left."""

    name: str
    measure: Callable[[str], float | None]
    runs_above: int = 1


@dataclass(frozen=True)
class Rung:
    """What one rung measured and decided: each candidate's score and the models it kept, in order."""

    name: str
    scores: dict[str, float]
    kept: tuple[str, ...]

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(m for m in self.scores if m not in self.kept)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scores": dict(self.scores), "kept": list(self.kept)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Rung:
        return cls(str(record["name"]), {str(k): float(v) for k, v in record["scores"].items()}, tuple(record["kept"]))


def run_rungs(candidates: Sequence[str], stages: Sequence[Stage], *, margin: float = MARGIN) -> list[Rung] | None:
    """Measure and halve, rung by rung; None when a measurement was interrupted (nothing is decided then).

    >>> probe = Stage("probe", {"a": 0.9, "b": 0.3, "c": 0.8}.get)
    >>> [r.kept for r in run_rungs(["a", "b", "c"], [probe])]
    [('a', 'c')]
    """
    left, rungs = tuple(candidates), []
    for stage in stages:
        if len(left) <= stage.runs_above:
            break
        scores: dict[str, float] = {}
        for model in left:
            score = stage.measure(model)
            if score is None:
                return None
            scores[model] = score
            log.info("model selection, %s: %s scores %.4f", stage.name, model, score)
        left = survivors(scores, margin=margin)
        rungs.append(Rung(stage.name, scores, left))
    return rungs


def final(candidates: Sequence[str], rungs: Sequence[Rung]) -> tuple[str, ...]:
    """The models the search chooses among: the last rung's survivors (all candidates when no rung ran)."""
    return rungs[-1].kept if rungs else tuple(candidates)


def describe(rungs: Sequence[Rung]) -> str:
    """One line: which models were dropped, why (their score against the best) and which were kept.

    >>> describe([Rung("linear probe", {"a": 0.9, "b": 0.3}, ("a",))])
    'model selection: linear probe dropped b (val acc 0.3000) vs val acc 0.9000 for a; kept a'
    """
    if not rungs:
        return "model selection: no rung ran; every candidate is searched"
    parts = []
    for rung in rungs:
        if not rung.dropped:
            parts.append(f"{rung.name} dropped none ({_scores(rung.scores)})")
            continue
        leader = max(rung.kept, key=lambda m: rung.scores[m])
        dropped = ", ".join(f"{m} ({_score(rung.scores[m])})" for m in rung.dropped)
        parts.append(f"{rung.name} dropped {dropped} vs {_score(rung.scores[leader])} for {leader}")
    return f"model selection: {'; '.join(parts)}; kept {', '.join(rungs[-1].kept)}"


def _scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {_score(s)}" for m, s in scores.items())


def _score(value: float) -> str:
    return f"val acc {value:.4f}" if math.isfinite(value) else "failed"


# ----------------------------------------------------------------------------------------------- the record


def save_record(study: optuna.Study, candidates: Sequence[str], rungs: Sequence[Rung]) -> None:
    """Write the selection into the study, the search's single record."""
    study.set_user_attr(STUDY_ATTR, {"candidates": list(candidates), "rungs": [r.to_dict() for r in rungs]})


def load_record(study: optuna.Study, candidates: Sequence[str]) -> list[Rung] | None:
    """The study's recorded selection (None if there is none); an error if it chose among other models."""
    record = study.user_attrs.get(STUDY_ATTR)
    if record is None:
        return None
    if list(record["candidates"]) != list(candidates):
        raise AutoftError(
            f"Study {study.study_name!r} selected among the models {','.join(record['candidates'])}, but --model now "
            f"names {','.join(candidates)}; give the same --model to continue it, or a new --study-name / --run-dir."
        )
    return [Rung.from_dict(r) for r in record["rungs"]]


def summary_line(study: optuna.Study) -> str | None:
    """The recorded selection in one line, for summaries (None when the search selected no model)."""
    record = study.user_attrs.get(STUDY_ATTR)
    return describe([Rung.from_dict(r) for r in record["rungs"]]) if record else None


# ----------------------------------------------------------------------------------------------- what is measured


def probe_recipe(max_epochs: int) -> Recipe:
    """Rung 1: a linear probe without augmentation, so it trains on cached features (``features.py``)."""
    return Recipe(
        freeze="linear_probe",
        freeze_bn_stats=True,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=1e-4,
        epochs=min(PROBE_EPOCHS, max_epochs),
        augment="none",
    )


def short_finetune_recipe(space: Space, max_epochs: int) -> Recipe:
    """Rung 2: the space's first portfolio recipe that fine-tunes more than the head, for ``SHORT_EPOCHS``
    epochs (the recipe defaults, a full AdamW fine-tune, when the space has none)."""
    entries = [dict(e) for e in getattr(space, "portfolio", ())]
    tuning = next((e for e in entries if e.get("freeze", "full") != "linear_probe"), {})
    return Recipe.from_params(tuning | {"epochs": min(SHORT_EPOCHS, max_epochs)})


# ----------------------------------------------------------------------------------------------- the model knob


@dataclass(frozen=True)
class ModelChoice:
    """A space with the ``model`` knob in front: categorical over ``models``, or fixed when only one is left.

    Its portfolio runs every entry of the inner space's portfolio on every model, entry by entry, so the
    warm start compares the models on the same recipes first.
    """

    space: Space
    models: tuple[str, ...]

    def sample(self, trial: TrialLike) -> dict[str, Any]:
        model = trial.suggest_categorical("model", list(self.models)) if len(self.models) > 1 else self.models[0]
        chosen = self.space.sample(trial)
        if "model" in chosen:
            raise AutoftError("The space function sets 'model'; give the candidate models with --model a,b instead.")
        return {"model": model, **chosen}

    def with_max_epochs(self, max_epochs: int, **rounds: Any) -> ModelChoice:
        return dataclasses.replace(self, space=self.space.with_max_epochs(max_epochs, **rounds))

    @property
    def portfolio(self) -> tuple[dict[str, Any], ...]:
        entries = getattr(self.space, "portfolio", ())
        pins = [{"model": m} for m in self.models] if len(self.models) > 1 else [{}]
        return tuple(dict(entry) | pin for entry in entries for pin in pins)


def with_models(space: Space, models: Sequence[str]) -> Space:
    """``space`` with the ``model`` knob over ``models`` (the survivors of selection).

    >>> from autoft.space import load_space
    >>> with_models(load_space("quick"), ["a", "b"]).portfolio
    ()
    """
    if isinstance(space, SearchSpace) and "model" in space.names():
        raise AutoftError(
            f"{space.source}: parameter 'model' is chosen by the controller; give the candidate models with "
            "--model a,b instead."
        )
    return ModelChoice(space, tuple(models))
