"""Search spaces: the fine-tuning knobs a search may vary, as data (YAML presets) rather than code.

A space is an ordered list of :class:`Param`. Sampling walks it in order, so a parameter's ``when``
condition can only name parameters listed before it; a parameter whose condition does not hold is not
suggested at all (Optuna then never sees it, and the sampler's model stays clean).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from autoft.errors import AutoftError, closest

__all__ = ["KINDS", "Param", "SearchSpace", "load_space", "preset_names"]

KINDS = ("float", "int", "categorical", "fixed")


class TrialLike(Protocol):
    """The slice of ``optuna.Trial`` a space needs (kept as a protocol so this module never imports optuna)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Param:
    """One searched knob. ``when`` maps earlier parameters to the values under which this one applies."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

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


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters; ``sample(trial)`` returns the values chosen for one trial.

    >>> space = load_space("default")
    >>> "lr" in space.names()
    True
    """

    params: tuple[Param, ...]
    source: str = "<code>"

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial: TrialLike) -> dict[str, Any]:
        """Suggest every parameter that applies, in order."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.applies(chosen):
                chosen[param.name] = param.suggest(trial)
        return chosen

    def with_max_epochs(self, max_epochs: int) -> SearchSpace:
        """The same space with the ``epochs`` range capped at ``max_epochs`` (the budget's fidelity)."""
        capped = []
        for p in self.params:
            if p.name == "epochs" and p.kind == "int":
                p = dataclasses.replace(p, low=min(p.low, max_epochs), high=min(p.high, max_epochs))
            elif p.name == "epochs" and p.kind == "fixed":
                p = dataclasses.replace(p, value=min(int(p.value), max_epochs))
            capped.append(p)
        return dataclasses.replace(self, params=tuple(capped))


def _presets_dir() -> Path:
    """Presets ship inside the wheel as ``autoft/search_spaces``; an editable install reads the repo's folder."""
    packaged = Path(str(resources.files("autoft"))) / "search_spaces"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "search_spaces"


def preset_names() -> list[str]:
    """Names of the bundled YAML presets."""
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a preset by name (``"default"``) or a YAML file by path, validated.

    >>> load_space("default").source.endswith("default.yaml")
    True
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = _presets_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            hint = closest(str(name_or_path), preset_names())
            raise AutoftError(
                f"No search space preset named {str(name_or_path)!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else ".")
                + f" Presets: {', '.join(preset_names())}; or give a path to a .yaml file."
            )
    if not path.is_file():
        raise AutoftError(f"Search space file {path} does not exist; check the path given to --space.")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AutoftError(f"Search space file {path} is not valid YAML: {exc}") from None
    return _parse(document, source=str(path))


def _parse(document: Any, *, source: str) -> SearchSpace:
    if not isinstance(document, dict) or not isinstance(document.get("params"), dict) or not document["params"]:
        raise AutoftError(f"{source}: a search space needs a non-empty mapping 'params:' of parameter definitions.")
    params: list[Param] = []
    for name, spec in document["params"].items():
        if str(name) in {p.name for p in params}:
            raise AutoftError(f"{source}: parameter {str(name)!r} is defined twice; keep one definition.")
        params.append(_parse_param(str(name), spec, earlier=[p.name for p in params], source=source))
    return SearchSpace(tuple(params), source=source)


def _parse_param(name: str, spec: Any, *, earlier: list[str], source: str) -> Param:
    where = f"{source}: parameter {name!r}"
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    kind = spec.get("type")
    if kind not in KINDS:
        raise AutoftError(f"{where} has type {kind!r}; use one of: {', '.join(KINDS)}.")
    when_spec = spec.get("when") or {}
    if not isinstance(when_spec, dict):
        raise AutoftError(f"{where}: 'when' must map earlier parameters to values, but got {when_spec!r}.")
    when = {}
    for other, allowed in when_spec.items():
        if other not in earlier:
            raise AutoftError(f"{where}: 'when' names {other!r}, which is not a parameter listed before it.")
        when[other] = tuple(allowed) if isinstance(allowed, list) else (allowed,)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise AutoftError(f"{where}: a categorical parameter needs a non-empty list 'choices'.")
        odd = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
        if odd:
            raise AutoftError(f"{where}: choices must be plain values (numbers, strings, true/false), not {odd[0]!r}.")
        if len(set(map(repr, choices))) < len(choices):
            raise AutoftError(f"{where}: 'choices' lists a value twice: {choices!r}.")
        return Param(name, kind, choices=tuple(choices), when=when)
    if kind == "fixed":
        return Param(name, kind, value=spec.get("value"), when=when)
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise AutoftError(f"{where} needs finite numeric 'low' and 'high', but got low={low!r}, high={high!r}.")
    if low > high:
        raise AutoftError(f"{where}: `low <= high` must hold, but got low={low}, high={high}.")
    if log and low <= 0:
        raise AutoftError(f"{where}: a log range must be positive, but got low={low}.")
    step = spec.get("step")
    step_types = (int,) if kind == "int" else (int, float)
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise AutoftError(f"{where}: an int parameter needs whole-number bounds, but got low={low!r}, high={high!r}.")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, step_types) or not 0 < step < math.inf or log
    ):
        raise AutoftError(
            f"{where}: 'step' must be a positive {kind} and cannot be combined with 'log: true', "
            f"but got step={step!r}, log={log}."
        )
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)
