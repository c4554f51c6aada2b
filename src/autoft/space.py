"""Search spaces: the fine-tuning knobs a search may vary, as data (YAML presets) or code.

A space is an ordered list of :class:`Param`. Sampling walks it in order, so a parameter's ``when``
condition can only name parameters listed before it; a parameter whose condition does not hold is not
suggested at all (Optuna then never sees it, and the sampler's model stays clean).

Three ways to give one: a preset name or YAML file (:func:`load_space`), a :class:`SearchSpace` built in
code, or a define-by-run function ``space(trial) -> dict`` for logic no file can express.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from autoft.errors import AutoftError, closest
from autoft.param import Param, TrialLike, check_param, number, param_from_spec
from autoft.recipe import Recipe

__all__ = [
    "FunctionSpace",
    "Param",
    "SearchSpace",
    "Space",
    "learned_portfolio",
    "load_space",
    "portfolio_table_names",
    "preset_description",
    "preset_names",
    "preset_path",
    "read_portfolio",
]


class Space(Protocol):
    """What a search needs of a space: values for one trial, and the budget's fidelity (a cap on the epochs and,
    when a pass over train does not fit, the examples of an epoch)."""

    def sample(self, trial: TrialLike) -> dict[str, Any]: ...
    def with_max_epochs(
        self, max_epochs: int, *, epoch_examples: int = 0, whole_passes: tuple[str, ...] = ()
    ) -> Space: ...


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters, validated on construction; ``sample(trial)`` returns one trial's values.

    >>> space = SearchSpace([Param("lr", "float", low=1e-4, high=1e-2, log=True), Param("epochs", "fixed", value=3)])
    >>> print(space.to_yaml(), end="")
    params:
      lr: {type: float, low: 0.0001, high: 0.01, log: true}
      epochs: 3
    """

    params: tuple[Param, ...]
    source: str = "search space <code>"
    # Warm start: known strong recipes tried before sampling; each maps some of the params to values.
    portfolio: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "portfolio", tuple(dict(entry) for entry in self.portfolio))
        if not self.params:
            raise AutoftError(f"{self.source}: a search space needs at least one parameter.")
        earlier: dict[str, Param] = {}
        for param in self.params:
            check_param(param, earlier, self.source)
            earlier[param.name] = param
        for i, entry in enumerate(self.portfolio):
            unknown = sorted(set(entry) - set(earlier))
            if unknown:
                raise AutoftError(
                    f"{self.source}: portfolio entry {i + 1} sets {', '.join(unknown)}, "
                    "which the space does not define."
                )

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def offered(self, name: str) -> tuple[Any, ...]:
        """The values parameter ``name`` may take: a categorical's choices, a fixed value, or a range's two ends;
        empty when the space does not have it.

        >>> SearchSpace([Param("freeze", "categorical", choices=["full", "lora"])]).offered("freeze")
        ('full', 'lora')
        """
        param = next((p for p in self.params if p.name == name), None)
        if param is None:
            return ()
        if param.kind == "categorical":
            return param.choices
        return (param.value,) if param.kind == "fixed" else (param.low, param.high)

    def sample(self, trial: TrialLike) -> dict[str, Any]:
        """Suggest every parameter that applies, in order."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.applies(chosen):
                chosen[param.name] = param.suggest(trial)
        return chosen

    def with_max_epochs(
        self, max_epochs: int, *, epoch_examples: int = 0, whole_passes: tuple[str, ...] = ()
    ) -> SearchSpace:
        """The same space with the ``epochs`` range capped at ``max_epochs`` (the budget's fidelity) and, given
        ``epoch_examples``, every trial's epoch that many examples (the budget's rounds), but for the freeze modes
        ``whole_passes`` (a linear probe whose passes fit anyway)."""
        if epoch_examples:
            offered = self.offered("freeze")
            when = {"freeze": tuple(m for m in offered if m not in whole_passes)} if whole_passes and offered else {}
            fixed = Param("epoch_examples", "fixed", value=int(epoch_examples), when=when)
            return self.with_param(fixed).with_max_epochs(max_epochs)
        if "epochs" not in self.names():  # the recipe's default must respect the cap too
            default = Recipe.__dataclass_fields__["epochs"].default
            return self.with_param(Param("epochs", "fixed", value=min(default, max_epochs)))
        capped = []
        for p in self.params:
            if p.name == "epochs" and p.kind == "int":
                p = dataclasses.replace(p, low=min(p.low, max_epochs), high=min(p.high, max_epochs))
            elif p.name == "epochs" and p.kind == "fixed":
                p = dataclasses.replace(p, value=min(int(p.value), max_epochs))
            capped.append(p)
        portfolio = tuple(
            {**entry, "epochs": min(int(entry["epochs"]), max_epochs)} if "epochs" in entry else entry
            for entry in self.portfolio
        )
        return dataclasses.replace(self, params=tuple(capped), portfolio=portfolio)

    def with_param(self, param: Param, *, first: bool = False) -> SearchSpace:
        """The same space with ``param`` added (or replacing the one of the same name)."""
        others = [p for p in self.params if p.name != param.name]
        params = [param, *others] if first else [*others, param]
        return dataclasses.replace(self, params=tuple(params))

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"params": {p.name: p.to_spec() for p in self.params}}
        return document | ({"portfolio": [dict(e) for e in self.portfolio]} if self.portfolio else {})

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The space as YAML (one line per parameter); written to ``path`` when given."""
        lines = ["params:"]
        for p in self.params:
            spec = yaml.safe_dump(p.to_spec(), default_flow_style=True, sort_keys=False, width=10_000).strip()
            lines.append(f"  {p.name}: {spec.removesuffix(chr(10) + '...').strip()}")
        if self.portfolio:
            lines.append("portfolio:")
            for entry in self.portfolio:
                flow = yaml.safe_dump(dict(entry), default_flow_style=True, sort_keys=False, width=10_000).strip()
                lines.append(f"  - {flow}")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, document: Any, *, source: str = "search space <code>") -> SearchSpace:
        """Build and validate a space from the YAML document's data (``{"params": {...}}``)."""
        if not isinstance(document, dict) or not isinstance(document.get("params"), dict) or not document["params"]:
            raise AutoftError(f"{source}: a search space needs a non-empty mapping 'params:' of parameter definitions.")
        extra = sorted(set(document) - {"params", "portfolio"})
        if extra:
            raise AutoftError(
                f"{source}: unknown top-level key(s) {', '.join(map(repr, extra))}; only 'params:' and 'portfolio:'."
            )
        portfolio = with_learned_portfolio(document, source).get("portfolio") or []
        if not isinstance(portfolio, list) or not all(isinstance(entry, dict) for entry in portfolio):
            raise AutoftError(
                f"{source}: 'portfolio:' must be a list of mappings from parameter names to values, "
                "or {learned: NAME} for a learned table."
            )
        params = tuple(param_from_spec(str(n), s, source) for n, s in document["params"].items())
        return cls(params, source=source, portfolio=tuple(portfolio))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Load and validate a YAML file (same as ``load_space(path)``)."""
        return load_space(Path(path))


@dataclass(frozen=True)
class FunctionSpace:
    """A define-by-run space: ``fn(trial) -> dict`` of knob values (any logic; Optuna's suggest_* calls).

    >>> space = FunctionSpace(lambda trial: {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True)})
    """

    fn: Callable[[TrialLike], Mapping[str, Any]]
    max_epochs: int | None = None
    epoch_examples: int = 0
    whole_passes: tuple[str, ...] = ()

    def sample(self, trial: TrialLike) -> dict[str, Any]:
        chosen = self.fn(trial)
        if not isinstance(chosen, Mapping):
            raise AutoftError(f"The space function {_fn_name(self.fn)} must return a dict of knobs, not {chosen!r}.")
        chosen = dict(chosen)
        if self.max_epochs is not None:
            default = Recipe.__dataclass_fields__["epochs"].default
            chosen["epochs"] = min(int(chosen.get("epochs", default)), self.max_epochs)
        if self.epoch_examples and chosen.get("freeze", Recipe().freeze) not in self.whole_passes:
            chosen["epoch_examples"] = self.epoch_examples
        return chosen

    def with_max_epochs(
        self, max_epochs: int, *, epoch_examples: int = 0, whole_passes: tuple[str, ...] = ()
    ) -> FunctionSpace:
        rounds = {"epoch_examples": epoch_examples, "whole_passes": whole_passes}
        return dataclasses.replace(self, max_epochs=max_epochs, **rounds)


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def describe_space(spec: Any) -> str:
    """A short text for ``config.yaml``: the preset name, path, or what kind of Python space was given."""
    if isinstance(spec, SearchSpace):
        return f"<SearchSpace: {', '.join(spec.names())}>"
    if callable(spec):
        return f"<function {_fn_name(spec)}>"
    return str(spec)


# ----------------------------------------------------------------------------------------------- presets, files


def _presets_dir() -> Path:
    """Presets ship inside the wheel as ``autoft/search_spaces``; an editable install reads the repo's folder."""
    packaged = Path(str(resources.files("autoft"))) / "search_spaces"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "search_spaces"


def preset_names() -> list[str]:
    """Names of the bundled YAML presets.

    >>> {"default", "quick", "full", "lp-ft"} <= set(preset_names())
    True
    """
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The file of a preset name (``"quick"``) or a path to a user's YAML file; unknown names list the presets."""
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
    return path


def portfolio_table_names() -> list[str]:
    """Names of the learned portfolio tables shipped in ``search_spaces/portfolios/`` (``portfolio: {learned: NAME}``).

    >>> "image" in portfolio_table_names()
    True
    """
    return sorted(p.stem for p in (_presets_dir() / "portfolios").glob("*.yaml"))


def learned_portfolio(name: str, *, source: str = "search space <code>") -> list[dict[str, Any]]:
    """The recipes of the learned table ``search_spaces/portfolios/NAME.yaml`` (``benchmarks/learn_portfolio.py``).

    >>> learned_portfolio("image")[0]["freeze"] in ("linear_probe", "partial", "full", "lp_ft")
    True
    """
    path = _presets_dir() / "portfolios" / f"{name}.yaml"
    if not path.is_file():
        hint = closest(name, portfolio_table_names())
        raise AutoftError(
            f"{source}: 'portfolio: {{learned: {name}}}' names no learned portfolio table"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
            + f" Tables: {', '.join(portfolio_table_names()) or 'none'}; or write the portfolio as a list of recipes."
        )
    return read_portfolio(path, fix="regenerate it with benchmarks/learn_portfolio.py --write")


def read_portfolio(path: Path, *, fix: str = "write it as 'portfolio:' followed by a list of {knob: value} recipes",
                   ) -> list[dict[str, Any]]:  # fmt: skip
    """The recipes of a portfolio file (``portfolio:`` and a non-empty list of recipes): a learned table, or a
    user's own (``--portfolio FILE``). Only YAML data is read; nothing in the file runs.

    >>> read_portfolio(Path("my-recipes.yaml"))[0]  # doctest: +SKIP
    {'freeze': 'full', 'lr': 0.001}
    """
    try:
        entries = (yaml.safe_load(Path(path).read_text()) or {}).get("portfolio")
    except (yaml.YAMLError, AttributeError, OSError):
        entries = None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise AutoftError(f"Portfolio file {path} must hold 'portfolio:', a non-empty list of recipes; {fix}.")
    return entries


def with_learned_portfolio(document: Any, source: str) -> Any:
    """``document`` with a ``portfolio: {learned: NAME}`` reference replaced by that table's recipes.

    Anything else is returned as it is (an inline list of recipes stays the user's own).
    """
    reference = document.get("portfolio") if isinstance(document, dict) else None
    if not isinstance(reference, dict) or "learned" not in reference:
        return document
    if set(reference) != {"learned"} or not isinstance(reference["learned"], str):
        raise AutoftError(
            f"{source}: 'portfolio:' as a mapping must be {{learned: NAME}} alone (a table of "
            f"search_spaces/portfolios/), but got {reference!r}."
        )
    return document | {"portfolio": learned_portfolio(reference["learned"], source=source)}


def preset_description(path: Path) -> str:
    """The leading comment of a space file, as one line of text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def load_space(
    spec: str | Path | SearchSpace | Callable[[TrialLike], Mapping[str, Any]] = "default",
    *,
    overrides: Sequence[str] = (),
    fixed: Sequence[str] = (),
    portfolio: Path | None = None,
) -> SearchSpace | FunctionSpace:
    """A validated space from a preset name, a YAML path, a :class:`SearchSpace` or a ``space(trial)`` function.

    ``overrides`` are ``PARAM.FIELD=VALUE`` edits (``"lr.high=1e-2"``, the CLI's ``--set``); ``fixed`` are
    ``PARAM=VALUE`` (``"optimizer=adamw"``, the CLI's ``--fix``): the parameter stops being searched.
    ``portfolio`` is a file of recipes (:func:`read_portfolio`, the CLI's ``--portfolio``) tried first instead of
    the space's own portfolio.

    >>> load_space("default", overrides=["lr.high=1e-2"], fixed=["optimizer=adamw"]).params[4].value
    'adamw'
    """
    if callable(spec) and not isinstance(spec, SearchSpace):
        if overrides or fixed or portfolio:
            raise AutoftError(
                "--set, --fix and --portfolio edit a YAML or SearchSpace space, not a space(trial) function."
            )
        return FunctionSpace(spec)
    if isinstance(spec, SearchSpace):
        document, source = spec.to_dict(), spec.source
    else:
        path = preset_path(spec)
        source = str(path)
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise AutoftError(
                f"Search space file {path} has a YAML syntax error{at}: {exc.problem or exc.context}."
            ) from None
        except yaml.YAMLError as exc:
            raise AutoftError(f"Search space file {path} is not valid YAML: {exc}") from None
    document = with_learned_portfolio(document, source)  # before --fix edits its entries
    if portfolio is not None:
        document = {**document, "portfolio": read_portfolio(portfolio)}
        source += f" (portfolio from {portfolio})"
    if overrides or fixed:
        document = _edited(document, overrides, fixed, source)
        source += " (with " + ", ".join([*(f"--set {o}" for o in overrides), *(f"--fix {f}" for f in fixed)]) + ")"
    return SearchSpace.from_dict(document, source=source)


def _value(text: str) -> Any:
    parsed = yaml.safe_load(text) if text.strip() else ""
    return number(parsed)


def _edited(document: Any, overrides: Sequence[str], fixed: Sequence[str], source: str) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("params"), dict):
        return document  # from_dict says what is wrong with it
    params = {name: (dict(spec) if isinstance(spec, dict) else spec) for name, spec in document["params"].items()}
    for edit in overrides:
        key, sep, text = edit.partition("=")
        name, dot, attribute = key.strip().partition(".")
        if not sep or not dot or not name or not attribute:
            raise AutoftError(f"--set expects PARAM.FIELD=VALUE (e.g. lr.high=1e-2), but got {edit!r}.")
        if name not in params:
            hint = closest(name, list(params))
            raise AutoftError(
                f"--set {edit}: {source} has no parameter {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + "; use --fix NAME=VALUE to add a fixed one."
            )
        if not isinstance(params[name], dict):
            raise AutoftError(f"--set {edit}: parameter {name!r} is a fixed value in {source}; use --fix {name}=VALUE.")
        params[name][attribute] = _value(text)
    for edit in fixed:
        name, sep, text = edit.partition("=")
        if not sep or not name.strip():
            raise AutoftError(f"--fix expects PARAM=VALUE (e.g. optimizer=adamw), but got {edit!r}.")
        name = name.strip()
        when = params[name].get("when") if isinstance(params.get(name), dict) else None
        params[name] = {"type": "fixed", "value": _value(text)} | ({"when": when} if when else {})
    fixed_names = {edit.partition("=")[0].strip() for edit in fixed}
    portfolio = [{k: v for k, v in entry.items() if k not in fixed_names} for entry in document.get("portfolio") or []]
    return document | {"params": params} | ({"portfolio": portfolio} if portfolio else {})
