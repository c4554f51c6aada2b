"""The one console every command prints to (stderr: stdout is left for data, e.g. predictions)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

__all__ = ["console", "one_line"]

console = Console(stderr=True)


def one_line(message: str) -> str:
    """The message as one line of plain text: control characters (a newline in a path) escaped, no rich markup."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))
