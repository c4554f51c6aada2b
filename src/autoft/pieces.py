"""Custom strategy pieces: your own freezing policies and optimizer factories, searched by name like the built-ins.

Register a piece before the search starts; a space may then list its name among the choices of ``freeze`` or
``optimizer``, and search the piece's own knobs (declared with defaults) like any other parameter::

    def bias_norm(model, recipe):                   # train biases, norm weights and the head
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or p.ndim == 1 or name.startswith("fc."))

    autoft.register_freeze("bias_norm", bias_norm)
    autoft.register_optimizer("rmsprop", lambda groups, recipe: torch.optim.RMSprop(groups, lr=recipe.lr,
                              alpha=recipe.knob("alpha")), knobs={"alpha": 0.99})

Registration is explicit (a call, never an import side effect) and lasts for the process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autoft.errors import AutoftError

__all__ = ["KINDS", "Piece", "get", "knob_defaults", "names", "register", "register_freeze", "register_optimizer"]

KINDS = ("freeze", "optimizer")


@dataclass(frozen=True)
class Piece:
    """A named strategy piece: ``fn`` does the work; ``knobs`` are its own searchable settings with defaults.

    ``freeze`` pieces: ``fn(model, recipe) -> None`` sets ``requires_grad`` on a model whose parameters all train.
    ``optimizer`` pieces: ``fn(param_groups, recipe) -> torch.optim.Optimizer``; each group carries
    ``lr_scale`` and ``weight_decay`` (head rate, layer-wise decay, no decay on biases and norms).
    """

    kind: str
    name: str
    fn: Callable[..., Any]
    knobs: Mapping[str, Any] = field(default_factory=dict)


_REGISTERED: dict[tuple[str, str], Piece] = {}


def register(kind: str, name: str, fn: Callable[..., Any], *, knobs: Mapping[str, Any] | None = None) -> Piece:
    """Register ``fn`` as the ``kind`` piece called ``name`` (re-registering a name replaces it).

    >>> register("freeze", "nothing", lambda model, recipe: None).name
    'nothing'
    """
    from autoft.recipe import FREEZE_MODES, OPTIMIZERS, Recipe  # recipe validates against this module

    builtin = {"freeze": FREEZE_MODES, "optimizer": OPTIMIZERS}
    if kind not in KINDS:
        raise AutoftError(f"Unknown kind of strategy piece {kind!r}; use one of: {', '.join(KINDS)}.")
    if not name or not isinstance(name, str) or name in builtin[kind]:
        raise AutoftError(
            f"A custom {kind} piece needs a new name, not {name!r} (built-in: {', '.join(builtin[kind])})."
        )
    if not callable(fn):
        raise AutoftError(f"Custom {kind} piece {name!r} needs a callable, but got {fn!r}.")
    fields = set(Recipe.__dataclass_fields__)
    clash = sorted(set(knobs or {}) & fields)
    if clash:
        raise AutoftError(
            f"Custom {kind} piece {name!r} declares knob(s) {', '.join(clash)}, which are built-in knobs."
        )
    piece = Piece(kind, name, fn, dict(knobs or {}))
    _REGISTERED[(kind, name)] = piece
    return piece


def register_freeze(name: str, fn: Callable[..., None], *, knobs: Mapping[str, Any] | None = None) -> Piece:
    """Register a freezing policy ``fn(model, recipe)``; search it with ``freeze: {choices: [..., name]}``."""
    return register("freeze", name, fn, knobs=knobs)


def register_optimizer(name: str, fn: Callable[..., Any], *, knobs: Mapping[str, Any] | None = None) -> Piece:
    """Register an optimizer factory ``fn(param_groups, recipe)``; search it with ``optimizer: {choices: [...]}``."""
    return register("optimizer", name, fn, knobs=knobs)


def unregister(kind: str, name: str) -> None:
    """Forget a registered piece (for tests and notebooks)."""
    _REGISTERED.pop((kind, name), None)


def names(kind: str) -> tuple[str, ...]:
    """Names of the registered pieces of ``kind``."""
    return tuple(name for k, name in _REGISTERED if k == kind)


def get(kind: str, name: str) -> Piece | None:
    """The registered piece, or None for a built-in name."""
    return _REGISTERED.get((kind, name))


def knob_defaults() -> dict[str, Any]:
    """Every registered piece's own knobs with their defaults."""
    return {k: v for piece in _REGISTERED.values() for k, v in piece.knobs.items()}
