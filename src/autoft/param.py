"""One searched knob (:class:`Param`): its kinds, reading it from a YAML/dict spec, and every rule it must meet.

Each rule fails with one sentence naming the source file, the parameter and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from autoft.errors import AutoftError, closest
from autoft.recipe import CONTROLLER_KNOBS, knob_choices, knob_names

__all__ = ["KINDS", "Param", "TrialLike", "check_param", "number", "param_from_spec"]

KINDS = ("float", "int", "categorical", "fixed")
_SPEC_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
    "fixed": {"value"},
}


class TrialLike(Protocol):
    """The slice of ``optuna.Trial`` a space needs (kept as a protocol so this module never imports optuna)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Param:
    """One searched knob: ``kind`` is float / int (``low``, ``high``, ``log``, ``step``), categorical
    (``choices``) or fixed (``value``). ``when`` maps earlier parameters to the value(s) under which it applies.

    >>> Param("train_blocks", "int", low=1, high=4, when={"freeze": "partial"}).when
    {'freeze': ('partial',)}
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        when = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in dict(self.when or {}).items()}
        object.__setattr__(self, "when", when)
        object.__setattr__(self, "choices", tuple(self.choices))

    def applies(self, chosen: Mapping[str, Any]) -> bool:
        """True when every ``when`` condition holds for the values chosen so far."""
        return all(name in chosen and chosen[name] in allowed for name, allowed in self.when.items())

    def suggest(self, trial: TrialLike) -> Any:
        """Ask the trial for a value of this parameter."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_spec(self) -> Any:
        """The YAML form: a bare value for an unconditional fixed parameter, else a mapping."""
        if self.kind == "fixed" and not self.when:
            return self.value
        spec: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            spec["choices"] = list(self.choices)
        elif self.kind == "fixed":
            spec["value"] = self.value
        else:
            spec |= {"low": self.low, "high": self.high}
            if self.log:
                spec["log"] = True
            if self.step is not None:
                spec["step"] = self.step
        if self.when:
            spec["when"] = {k: (v[0] if len(v) == 1 else list(v)) for k, v in self.when.items()}
        return spec


def number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; accept it as the number everyone means."""
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value


def param_from_spec(name: str, spec: Any, source: str) -> Param:
    where = f"{source}: parameter {name!r}"
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    kind = spec.get("type")
    if kind not in KINDS:
        hint = closest(str(kind), KINDS)
        raise AutoftError(
            f"{where} has unknown type {kind!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; use one of: {', '.join(KINDS)}."
        )
    unknown = sorted(set(spec) - _SPEC_KEYS[kind] - {"type", "when"})
    if unknown:
        allowed = sorted(_SPEC_KEYS[kind] | {"type", "when"})
        hint = closest(unknown[0], allowed)
        raise AutoftError(
            f"{where}: unknown key {unknown[0]!r} for a {kind} parameter"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; allowed: {', '.join(allowed)}."
        )
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise AutoftError(f"{where}: 'when' must map earlier parameters to values, but got {when!r}.")
    choices = spec.get("choices", ())
    if kind == "categorical" and not isinstance(choices, list):
        raise AutoftError(f"{where}: a categorical parameter needs a non-empty list 'choices', but got {choices!r}.")
    return Param(
        name,
        kind,
        low=number(spec.get("low")),
        high=number(spec.get("high")),
        log=spec.get("log", False),
        step=number(spec.get("step")),
        choices=tuple(choices),
        value=spec.get("value"),
        when=when,
    )


def check_param(p: Param, earlier: Mapping[str, Param], source: str) -> None:
    """Every rule a parameter must meet, each failing with one sentence naming the source and the parameter."""
    where = f"{source}: parameter {p.name!r}"
    if p.kind not in KINDS:
        raise AutoftError(f"{where} has unknown type {p.kind!r}; use one of: {', '.join(KINDS)}.")
    if p.name in earlier:
        raise AutoftError(f"{where} is listed twice; give each parameter once.")
    knobs = knob_names() + list(CONTROLLER_KNOBS)
    if p.name not in knobs:
        hint = closest(p.name, knobs)
        raise AutoftError(
            f"{where} is not a strategy knob"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; knobs: {', '.join(knobs)}, or the knobs of a custom piece registered with autoft.register_freeze "
            "or autoft.register_optimizer."
        )
    for other, allowed in p.when.items():
        if other not in earlier:
            problem = "which is listed after it" if other in knobs else "which is no parameter of this space"
            raise AutoftError(f"{where}: 'when' names {other!r}, {problem}; a condition names an earlier parameter.")
        source_param = earlier[other]
        if source_param.kind == "categorical":
            stray = [v for v in allowed if v not in source_param.choices]
            if stray:
                raise AutoftError(
                    f"{where}: 'when' asks for {other}={stray[0]!r}, which is not among its choices "
                    f"{list(source_param.choices)}."
                )
    vocabulary = knob_choices(p.name)
    if p.kind == "categorical":
        if not p.choices:
            raise AutoftError(f"{where}: a categorical parameter needs a non-empty list 'choices'.")
        values = p.choices
    elif p.kind == "fixed":
        values = (p.value,)
    else:
        values = ()
        _check_range(p, where)
    if vocabulary is not None:
        for value in values:
            if value not in vocabulary:
                hint = closest(str(value), [str(v) for v in vocabulary])
                raise AutoftError(
                    f"{where}: {value!r} is not a known {p.name}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; choose from: {', '.join(map(str, vocabulary))} (or register a custom piece)."
                )
    if p.kind == "categorical" and any(
        v is not None and not isinstance(v, bool | int | float | str) for v in p.choices
    ):
        raise AutoftError(f"{where}: choices must be plain values (numbers, strings, booleans).")
    if p.kind == "categorical" and len(set(map(repr, p.choices))) < len(p.choices):
        raise AutoftError(f"{where}: 'choices' lists a value twice: {list(p.choices)!r}.")


def _check_range(p: Param, where: str) -> None:
    low, high = p.low, p.high
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise AutoftError(f"{where} needs finite numeric 'low' and 'high', but got low={low!r}, high={high!r}.")
    if low > high:
        raise AutoftError(f"{where}: `low <= high` must hold, but got low={low}, high={high}.")
    if not isinstance(p.log, bool):
        raise AutoftError(f"{where}: 'log' must be true or false, but got {p.log!r}.")
    if p.log and low <= 0:
        raise AutoftError(
            f"{where}: a log range cannot include 0 or negative values, but got low={low}; "
            "use a small positive low (e.g. 1.0e-6) or drop 'log: true'."
        )
    if p.kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise AutoftError(f"{where}: an int parameter needs whole-number bounds, but got low={low!r}, high={high!r}.")
    step = p.step
    step_types = (int,) if p.kind == "int" else (int, float)
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, step_types) or not 0 < step < math.inf or p.log
    ):
        raise AutoftError(
            f"{where}: 'step' must be a positive {p.kind} and cannot be combined with 'log: true', "
            f"but got step={step!r}, log={p.log}."
        )
