"""The ``autoft`` command as a user runs it: a real subprocess, a real tiny search, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import autoft
from autoft.cli import main
from autoft.tasks.image.models import create
from conftest import make_image_folder


def autoft_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "autoft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_search_end_to_end_then_load_and_predict(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True)
    args = ("search", "--model", "test_resnet", "--no-pretrained", "--data", str(data))
    done = autoft_cli(*args, "--trials", "3", "--max-epochs", "2", "--image-size", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Best trials" in done.stderr and "test accuracy" in done.stderr
    run = tmp_path / "runs" / "test_resnet-data"
    assert (run / "study.db").is_file() and (run / "trials.csv").read_text().count("\n") == 4
    assert "wrote the report" in (run / "search.log").read_text()  # the log's last lines, through the quick exit
    meta = json.loads((run / "best" / "config.json").read_text())
    tuned = autoft.load_model(run / "best")
    files = sorted((data / "test").glob("*/*.png"))
    accuracy = sum(p == f.parent.name for p, f in zip(tuned.predict(files), files, strict=True)) / len(files)
    assert accuracy == pytest.approx(meta["test_accuracy"])

    again = autoft_cli(*args, "--trials", "4", "--max-epochs", "2", "--image-size", "16", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (run / "trials.csv").read_text().count("\n") == 5  # continued the study: one more trial


def test_the_command_exits_at_once_yet_runs_exit_handlers_flushes_and_waits_for_threads(tmp_path: Path) -> None:
    # _exit_at_once skips the interpreter's teardown (seconds after a search); nothing that teardown did for us
    # may be lost: the exit code, buffered output, atexit handlers (logging, Ray, temporary folders), live threads.
    script = """
import atexit, sys, threading, time
from pathlib import Path
from autoft.cli import _exit_at_once
atexit.register(lambda: print("handler ran", flush=True))
print("buffered", end="")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), Path(sys.argv[2]).write_text("done"))).start()
_exit_at_once(3)
"""
    quick = subprocess.run([sys.executable, "-c", script, "-"], capture_output=True, text=True, timeout=60)
    assert quick.returncode == 3 and quick.stdout == "bufferedhandler ran\n", quick.stderr
    marker = tmp_path / "written"
    waited = subprocess.run([sys.executable, "-c", script, "thread", str(marker)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert waited.returncode == 3 and marker.read_text() == "done"  # a non-daemon thread finished its work


def test_the_command_starts_without_scikit_learn() -> None:
    # Every command pays its imports: scikit-learn (1.4 s on 2 cores, for the report's fANOVA importances only)
    # is loaded when importances are computed, not when autoft starts.
    script = "import sys, autoft.cli; print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_study_storages_imports_load_in_a_thread_of_their_own(tmp_path: Path) -> None:
    # SQLAlchemy and alembic (1.2 s of a 30 s budget on 2 cores) load while the model and data are prepared.
    script = (
        "import sys; from pathlib import Path; from autoft.config import SearchConfig; from autoft import study\n"
        f"config = SearchConfig(model='m', data=Path('.'), storage='sqlite:///{tmp_path}/s.db')\n"
        "before = 'sqlalchemy.orm' in sys.modules; thread = study.preload_storage(config); thread.join(60)\n"
        "print(before, all(name in sys.modules for name in study.STORAGE_MODULES), thread.name)\n"
        "print(study.preload_storage(SearchConfig(model='m', data=Path('.'), storage='journal.log')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False", "True", "autoft-preload-storage", "None"], (
        done.stdout + done.stderr
    )


def test_the_commands_timeout_counts_from_when_autoft_began_to_load(tmp_path: Path, capsys) -> None:
    # The console script passes autoft's import time (9-10 s on 2 cores): here 28 s already spent of a 30 s budget.
    data = make_image_folder(tmp_path / "data", per_class=4, size=(16, 16))
    args = ["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data), "--image-size", "16",
            "--timeout", "30s", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args, started_at=time.time() - 28) == 2
    said = re.search(r"--timeout 30s is too short: preparing and probing took (\d+)s", capsys.readouterr().err)
    assert said and int(said.group(1)) >= 28


def test_help_documents_every_option(tmp_path: Path) -> None:
    done = autoft_cli("search", "--help", cwd=tmp_path)
    assert done.returncode == 0
    for option in ("--model", "--data", "--weights", "--no-pretrained", "--trials", "--timeout", "--image-size",
                   "--val-fraction", "--storage", "--study-name", "--seed", "--run-dir", "--max-epochs", "--cache-dir",
                   "--no-cache"):  # fmt: skip
        assert option in done.stdout


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The CLI's own entry point in this process (no interpreter start-up): exit code and what it printed."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _bad_folders(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: extra CLI arguments and a phrase the one-sentence error must contain."""
    no_classes = tmp / "no_classes"
    no_classes.mkdir()
    empty_class = make_image_folder(tmp / "empty_class", layout="flat", per_class=4)
    (empty_class / "zebra").mkdir()
    one_class = make_image_folder(tmp / "one_class", classes=("cat",), layout="flat", per_class=4)
    differ = make_image_folder(tmp / "differ", per_class=4)
    (differ / "val" / "fish").rename(differ / "val" / "shark")
    lost = make_image_folder(tmp / "lost", layout="flat", per_class=4)
    for image in (lost / "dog").iterdir():
        image.write_bytes(b"not an image")
    return {
        "missing": (["--data", str(tmp / "nope")], "does not exist"),
        "no class folders": (["--data", str(no_classes)], "class"),
        "empty class": (["--data", str(empty_class)], "zebra"),
        "one class": (["--data", str(one_class)], "one class"),
        "classes differ": (["--data", str(differ)], "shark"),
        "class lost to unreadable files": (["--data", str(lost)], "dog"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "no class folders",
        "empty class",
        "one class",
        "classes differ",
        "class lost to unreadable files",
    ],
)
def test_bad_data_is_one_clear_error_and_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    extra, phrase = _bad_folders(tmp_path)[case]
    run_dir = ["--run-dir", str(tmp_path / "run")]
    code, err = run_in_process(capsys, "search", "--model", "test_resnet", "--no-pretrained", *extra, *run_dir)
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert phrase.lower() in " ".join(err.lower().split())


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--trials", "0"], "--trials"),
        (["--timeout", "ten minutes"], "--timeout"),
        (["--model", "resnet5"], "resnet50"),  # suggests close names
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--max-concurrent", "0"], "--max-concurrent"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial"),
        (["--backend", "local", "--address", "auto"], "--address"),
    ],
)
def test_bad_options_are_one_clear_error_and_exit_2(
    tmp_path: Path, extra: list[str], phrase: str, capsys: pytest.CaptureFixture
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    model = [] if "--model" in extra else ["--model", "test_resnet"]
    args = [
        "search",
        *model,
        "--no-pretrained",
        "--data",
        str(data),
        "--run-dir",
        str(tmp_path / "run"),
        *extra,
    ]
    code, err = run_in_process(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and phrase in err


def test_weights_that_do_not_fit_the_model_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    weights = tmp_path / "other.pth"
    torch.save(create("test_efficientnet", num_classes=3, pretrained=False).state_dict(), weights)
    args = ["--weights", str(weights), "--data", str(data), "--run-dir", str(tmp_path / "run")]
    code, err = run_in_process(capsys, "search", "--model", "test_resnet", *args)
    assert code == 2, err
    assert "Traceback" not in err and "does not fit" in err


@pytest.mark.slow
def test_a_model_folder_given_as_a_path_is_searched_and_its_weights_used(tmp_path: Path) -> None:
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("test_resnet"), str(tmp_path / "my-model"), safe_serialization=True)
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16))
    args = ("search", "--model", "./my-model", "--data", str(data), "--image-size", "16", "--run-dir", "run")
    done = autoft_cli(*args, "--trials", "1", "--max-epochs", "1", "--fix", "freeze=linear_probe", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tuned = autoft.load_model(tmp_path / "run" / "best")
    original = timm.create_model("local-dir:" + str(tmp_path / "my-model"), pretrained=True)
    # A linear probe keeps the backbone (compared on the CPU: load_model puts the model on the GPU where there is one)
    assert torch.equal(tuned.model.conv1[0].weight.cpu(), original.conv1[0].weight)
