"""The one exception type users see: a clear sentence saying what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["AutoftError", "brief", "closest"]


class AutoftError(Exception):
    """Bad input or an unusable environment. The CLI prints the message and exits with code 2."""


def closest(name: str, choices: Iterable[str], *, n: int = 3) -> list[str]:
    """The names in ``choices`` closest to ``name``, best first (for "did you mean" hints).

    >>> closest("resnet5", ["resnet50", "resnet18", "vit_base"])
    ['resnet50', 'resnet18']
    """
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)


def brief(err: BaseException | str, limit: int = 160) -> str:
    """An error (or any text) as one short line, for a message that quotes it.

    >>> brief(ValueError("a\\n  b"))
    'a b'
    """
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
