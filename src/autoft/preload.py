"""Import modules in a background thread, so that loading them overlaps work that releases the GIL (model and
data preparation, training steps) instead of following it. Whoever uses a module later needs no wait: Python's
per-module import locks make it wait for a module the thread is still importing, never import one twice. A failed
import is left for its user to meet and report.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

__all__ = ["preload"]


def preload(modules: Sequence[str], *, name: str) -> threading.Thread:
    """Start a daemon thread called ``name`` that imports ``modules`` in order; it stops at the first failure.

    >>> preload(["json", "csv"], name="autoft-preload-example").join()
    """

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # broad on purpose: the module's user imports it again and says what is wrong
                return

    thread = threading.Thread(target=load, name=name, daemon=True)
    thread.start()
    return thread
