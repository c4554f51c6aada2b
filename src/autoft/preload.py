"""Import modules in a background thread, so that loading them overlaps work that releases the GIL (model and
data preparation, training steps) instead of following it. Whoever uses a module later needs no wait: Python's
per-module import locks make it wait for a module the thread is still importing, never import one twice. A failed
import is left for its user to meet and report.

An import that writes the environment must not run in such a thread: glibc's setenv may move the environment while
another thread's getenv reads it, and Ray's and gRPC's threads call getenv at any time. A CI run's search died of
SIGSEGV in getenv that way (2026-12-05): scikit-learn's ``__init__`` sets two variables, and it was being imported in
the background while Ray ran the trials. :func:`settle_environment` writes such variables on the main thread first,
before the native libraries' threads start, so that the background import finds them set and writes nothing.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping, Sequence

__all__ = ["preload", "settle_environment"]


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


def settle_environment(defaults: Mapping[str, str]) -> None:
    """Set the variables of ``defaults`` that are not set yet (``os.environ.setdefault``); call it on the main
    thread before any thread that may read the environment starts, and before :func:`preload` of the modules that
    would write them. A variable already set is not written again, whatever its value.

    >>> settle_environment({"PATH": "/nowhere"}); os.environ["PATH"] != "/nowhere"  # set already: kept
    True
    """
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
