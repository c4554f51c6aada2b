"""Background imports write nothing to the environment once the controller has settled it (autoft.preload)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from autoft import figures
from autoft.preload import preload, settle_environment

SRC = Path(__file__).resolve().parents[1] / "src"

# A fresh interpreter: in this one the modules may be imported already, and a second import writes nothing.
RECORD_WRITES = """
import json, os, sys
import autoft.controller  # what a search has loaded when the trials' preload starts
from autoft import figures, study
from autoft.preload import preload, settle_environment

{settle}
writes = []
set_item = os._Environ.__setitem__
os._Environ.__setitem__ = lambda self, key, value: (writes.append(key), set_item(self, key, value))
preload(study.STORAGE_MODULES + figures.IMPORTANCE_MODULES, name="test").join()
assert "sklearn" in sys.modules and "alembic" in sys.modules, "the preload must really import them"
print(json.dumps(writes))
"""


def writes_of_the_preload(settle: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in figures.IMPORTANCE_ENVIRONMENT}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", RECORD_WRITES.format(settle=settle)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def test_the_preloaded_imports_write_the_environment_only_where_it_was_not_settled() -> None:
    # Unsettled, scikit-learn's import writes its variables from the thread (what crashed a search under Ray)...
    assert set(writes_of_the_preload("")) == set(figures.IMPORTANCE_ENVIRONMENT)
    # ...settled first on the main thread, as run_search does, the thread writes nothing.
    assert writes_of_the_preload("settle_environment(figures.IMPORTANCE_ENVIRONMENT)") == []


def test_settling_keeps_what_the_user_set(monkeypatch) -> None:
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "FALSE")
    monkeypatch.delenv("KMP_INIT_AT_FORK", raising=False)  # and restored after the test, whatever settling writes
    settle_environment(figures.IMPORTANCE_ENVIRONMENT)
    assert os.environ["KMP_DUPLICATE_LIB_OK"] == "FALSE"
    assert os.environ["KMP_INIT_AT_FORK"] == figures.IMPORTANCE_ENVIRONMENT["KMP_INIT_AT_FORK"]


def test_a_failed_import_ends_the_thread_quietly() -> None:
    thread = preload(["autoft_no_such_module", "json"], name="test-preload-failure")
    thread.join(timeout=30)
    assert not thread.is_alive()
