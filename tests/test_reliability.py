"""Faults a search survives, each injected for real: kill -9, SIGINT/SIGTERM, divergence, out of memory, disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import autoft
import autoft.cli
from autoft import pieces, results
from autoft.config import SearchConfig
from autoft.controller import _stop_on_signals, run_search
from autoft.keeper import check_free_space
from autoft.preparation import prepare
from autoft.study import open_study
from conftest import make_image_folder

TINY = {"pretrained": False, "image_size": 16, "max_epochs": 3}
# Every trial trains 3 epochs of 3 steps (no pruning), so a signal can land while a trial runs.
SLOW_SPACE = """params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  optimizer: adamw
  epochs: 3
  batch_size: 8
"""


# ----------------------------------------------------------------------------- helpers


def _cli_args(tmp_path: Path, trials: int) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        make_image_folder(data, per_class=8, size=(16, 16))
        (tmp_path / "space.yaml").write_text(SLOW_SPACE)
    return [
        sys.executable, "-m", "autoft", "search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
        "--space", str(tmp_path / "space.yaml"), "--trials", str(trials), "--image-size", "16", "--pruner", "none",
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(Path(autoft.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONPATH": path}


def _trials_in(db: Path) -> list[tuple[int, str, int]]:
    """(number, state, reported epochs) of every trial, read straight from the SQLite file."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(
            "SELECT number, state, (SELECT COUNT(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id) "
            "FROM trials t ORDER BY number"
        ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()


def _start_and_wait_mid_trial(tmp_path: Path, trials: int) -> subprocess.Popen:
    """Start the CLI and return once a trial has completed and another one is RUNNING with an epoch reported."""
    proc = subprocess.Popen(_cli_args(tmp_path, trials), cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        rows = _trials_in(tmp_path / "run" / "study.db")
        if any(s == "COMPLETE" for _, s, _ in rows) and any(s == "RUNNING" and n >= 1 for _, s, n in rows):
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no trial was seen running after a complete one: {proc.communicate()[1][-2000:]}")


def _load_study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")


def _assert_best_is_best_complete_trial(tmp_path: Path) -> None:
    study = _load_study(tmp_path)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    tuned = autoft.load_model(tmp_path / "run" / "best")  # loads: weights and config agree
    exported = study.trials[tuned.meta["trial"]]
    assert exported.state == TrialState.COMPLETE
    assert exported.value == max(t.value for t in complete)


# ----------------------------------------------------------------------------- crashes and signals


@pytest.mark.slow
def test_kill_9_mid_trial_then_same_command_resumes(tmp_path: Path) -> None:
    proc = _start_and_wait_mid_trial(tmp_path, trials=2)
    proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the study
    proc.communicate()
    before = _trials_in(tmp_path / "run" / "study.db")
    killed = next(number for number, state, _ in before if state == "RUNNING")
    finished_before = {t.number: (t.params, t.value) for t in _load_study(tmp_path).trials if t.state.is_finished()}
    _assert_best_is_best_complete_trial(tmp_path)  # never a half-written best/ on disk

    again = subprocess.run(_cli_args(tmp_path, trials=2), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    study = _load_study(tmp_path)
    for number, (params, value) in finished_before.items():  # kept, not re-run
        assert study.trials[number].params == params and study.trials[number].value == value
    crashed = study.trials[killed]
    assert crashed.state == TrialState.FAIL and crashed.user_attrs["interrupted"] is True
    retried = [t for t in study.trials if t.number > killed and t.params == crashed.params]
    assert len(retried) == 1 and retried[0].state.is_finished()
    assert results.finished_count(study) == 2  # the budget counts finished trials, not the interrupted one
    _assert_best_is_best_complete_trial(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_running_trial_and_writes_results(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    proc = _start_and_wait_mid_trial(tmp_path, trials=20)
    running = next(n for n, s, _ in _trials_in(tmp_path / "run" / "study.db") if s == "RUNNING")
    sent, sent_wall = time.monotonic(), time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}" in err and "Best trials" in err and "Traceback" not in err
    seconds = time.monotonic() - sent
    study = _load_study(tmp_path)
    stopped = study.trials[running]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    assert len(stopped.intermediate_values) < 3, "the trial must stop at its next step, not run to its end"
    assert len(study.trials) == running + 1, "no trial may start after the signal"
    csv = (tmp_path / "run" / "trials.csv").read_text()
    assert csv.count("\n") == running + 2 and "interrupted" in csv
    _assert_best_is_best_complete_trial(tmp_path)
    report = tmp_path / "run" / "report.html"  # written on the way out, with the stopped trial in it
    assert report.is_file() and report.stat().st_mtime >= sent_wall - 1
    states = json.loads((tmp_path / "run" / "report.json").read_text())["states"]
    assert states["FAIL"] == 1 and sum(states.values()) == running + 1
    assert '<tr class="FAIL">' in report.read_text()
    print(f"{sig.name}: exited {seconds:.1f}s after the signal")

    if sig != signal.SIGINT:
        return
    # Running the same command again retries the interrupted trial's parameters first.
    again = subprocess.run(_cli_args(tmp_path, trials=running + 1), cwd=tmp_path, env=_env(), capture_output=True)
    assert again.returncode == 0, again.stderr
    assert _load_study(tmp_path).trials[running + 1].params == stopped.params


def test_first_signal_sets_the_stop_flag_and_a_second_raises_at_once() -> None:
    # Start from Python's own handler, whatever an earlier test in this process left installed (Ray sets its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop, received = threading.Event(), []
    with _stop_on_signals(stop, received), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here: no KeyboardInterrupt, just the flag
        assert stop.is_set() and received == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)  # the default handler is back: a second Ctrl-C leaves at once
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- bad trials


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16))


def _enqueued_search(tmp_path: Path, data: Path, space: str, enqueue: list[dict], setup_hook=None):
    (tmp_path / "space.yaml").write_text(space)
    config = SearchConfig(
        model="test_resnet", data=data, trials=len(enqueue), space=str(tmp_path / "space.yaml"),
        run_dir=tmp_path / "run", pruner="none", **TINY,
    ).resolved()  # fmt: skip
    config.run_dir.mkdir(parents=True)
    study = open_study(config)
    for params in enqueue:
        study.enqueue_trial(params)
    setup = prepare(config)
    if setup_hook:
        setup_hook(setup)
    return run_search(config, setup=setup)


@pytest.mark.slow
def test_diverged_trial_is_pruned_with_its_reason_and_the_search_goes_on(tmp_path: Path, data: Path) -> None:
    space = "params:\n  lr: {type: categorical, choices: [1.0e+30, 1.0e-3]}\n  optimizer: sgd\n  epochs: 2\n"
    space += "  batch_size: 8\n"
    result = _enqueued_search(tmp_path, data, space, [{"lr": 1e30}, {"lr": 1e-3}])
    diverged, fine = result.study.trials
    assert diverged.state == TrialState.PRUNED and "training loss became nan" in diverged.user_attrs["diverged"]
    assert fine.state == TrialState.COMPLETE and result.best_trial == 1
    assert "diverged: training loss became nan" in (tmp_path / "run" / "trials.csv").read_text()


def _out_of_memory_above(limit: int, seen: list[int]):
    """A real forward pre-hook that raises the device's out-of-memory error for training batches above ``limit``;
    ``seen`` records every training batch size that reached the model."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            seen.append(inputs[0].shape[0])
            if inputs[0].shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (batch {inputs[0].shape[0]} > {limit})")

    return lambda setup: setup.base_model.register_forward_pre_hook(hook)  # copied into every trial's model


@pytest.mark.slow
def test_out_of_memory_is_retried_once_at_half_the_batch_size(
    tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every step trains the whole model (freeze full), so every training batch meets the hook.
    space = "params:\n  batch_size: {type: categorical, choices: [16, 32]}\n  freeze: full\n  epochs: 1\n"
    seen: list[int] = []
    enqueue = [{"batch_size": 16}, {"batch_size": 32}]
    result = _enqueued_search(tmp_path, data, space, enqueue, setup_hook=_out_of_memory_above(8, seen))
    retried, failed = result.study.trials
    # (The plan's timing steps come first: they halve their own batch when out of memory.)
    assert seen[-2:] == [24, 16]  # trial 1: out of memory at 32 (all 24 images in one batch), and again at 16
    before = seen[:-2]
    trial_0 = before[len(before) - 1 - before[::-1].index(16) :]  # from its first batch, at 16
    assert trial_0[0] == 16 and len(trial_0) > 1 and set(trial_0[1:]) == {8}  # 16 runs out, then all of it at 8
    assert retried.state == TrialState.COMPLETE and retried.user_attrs["oom_retry_batch_size"] == 8
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["error"].startswith("OutOfMemoryError: also at half the batch size (16)")
    assert "trial 0 ran out of device memory: retrying at batch size 8" in caplog.text
    meta = json.loads((result.model_dir / "config.json").read_text())
    assert meta["trial"] == 0 and meta["params"]["batch_size"] == 8  # exported with the batch size it trained at
    assert "out of memory: ran at batch size 8" in (tmp_path / "run" / "trials.csv").read_text()


@pytest.mark.slow
def test_every_trial_failing_exits_non_zero_with_the_distinct_errors(tmp_path: Path, data: Path) -> None:
    space = tmp_path / "space.yaml"  # each trial fails with its own error, so no systematic stop
    space.write_text("params:\n  batch_size: {type: categorical, choices: [0, -1]}\n  epochs: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "autoft", "search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
         "--space", str(space), "--trials", "4", "--image-size", "16", "--sampler", "random",
         "--run-dir", str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert "No trial completed (4 trials" in err and "2 distinct error(s)" in err
    assert "batch_size=0" in err and "batch_size=-1" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_same_error_in_the_last_5_trials_stops_the_search_with_exit_2(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    calls: list[int] = []

    def breaks_after_the_first_trial(model: nn.Module, recipe: autoft.Recipe) -> None:
        calls.append(1)
        if len(calls) > 1:  # trial 0 completes, so the first-3-trials rule cannot be what stops the search
            raise RuntimeError("the custom freeze broke")

    pieces.register_freeze("breaks", breaks_after_the_first_trial)
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  freeze: breaks\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
                     "  epochs: 1\n  batch_size: 8\n")  # fmt: skip
    try:
        code = autoft.cli.main(["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
                                "--space", str(space), "--trials", "20", "--image-size", "16", "--no-warm-start",
                                "--run-dir", str(tmp_path / "run")])  # fmt: skip
    finally:
        pieces.unregister("freeze", "breaks")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    message = (
        "error: Stopped the search: every recent trial failed with the same error: RuntimeError: the custom freeze"
    )
    assert message in err and "Traceback" not in err
    states = [t.state for t in _load_study(tmp_path).trials]
    assert states == [TrialState.COMPLETE] + [TrialState.FAIL] * 5  # stopped at once, 14 trials short of 20


# ----------------------------------------------------------------------------- disk


def test_too_little_free_space_is_reported_before_training(tmp_path: Path) -> None:
    with torch.device("meta"):  # a real 4 TB model that allocates nothing
        huge = nn.Linear(1_000_000, 1_000_000)
    with pytest.raises(autoft.AutoftError, match="Not enough free disk space"):
        check_free_space(tmp_path, huge)
    check_free_space(tmp_path, nn.Linear(4, 2))  # a small one fits


def test_run_dir_that_cannot_be_created_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    (tmp_path / "a_file").write_text("")
    args = ["--data", str(data), "--run-dir", str(tmp_path / "a_file" / "run")]
    code = autoft.cli.main(["search", "--model", "test_resnet", "--no-pretrained", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot create run directory" in err and "Traceback" not in err


def test_a_file_where_the_run_dir_should_be_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    (tmp_path / "run").write_text("a regular file")
    code = autoft.cli.main(["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
                            "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"error: Cannot create run directory {tmp_path / 'run'}" in err, err
    assert "--run-dir" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_run_dir_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # /proc/self is a folder no one may create files in, root included (a read-only mount behaves the same;
    # a chmod 500 folder would not stop root, and CI runs as root).
    data = make_image_folder(tmp_path / "data", per_class=4)
    code = autoft.cli.main(["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
                            "--run-dir", "/proc/self"])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "error: Run directory /proc/self is not writable" in err, err
    assert "--run-dir" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- bad input (exit 2, one sentence)


def _bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "corrupt.pth").write_bytes(b"\x80\x02 this is not a checkpoint")
    (tmp / "empty.safetensors").write_bytes(b"")
    spaces = {
        "yaml": "params: {lr: [unclosed\n",
        "type": "params:\n  lr: {type: floaty, low: 1, high: 2}\n",
        "bounds": "params:\n  lr: {type: float, low: 2, high: 1}\n",
        "when": "params:\n  train_blocks: {type: int, low: 1, high: 3, when: {freeze: partial}}\n",
        "empty": "params: {}\n",
    }
    for name, text in spaces.items():
        (tmp / f"{name}.yaml").write_text(text)
    return {
        "weights missing": (["--weights", str(tmp / "nope.pth")], "does not exist"),
        "weights corrupt": (["--weights", str(tmp / "corrupt.pth")], "could not be read"),
        "weights zero bytes": (["--weights", str(tmp / "empty.safetensors")], "could not be read"),
        "space file missing": (["--space", str(tmp / "nope.yaml")], "does not exist"),
        "space preset unknown": (["--space", "defualt"], "did you mean 'default'"),
        "space yaml syntax": (["--space", str(tmp / "yaml.yaml")], "YAML syntax error"),
        "space unknown type": (["--space", str(tmp / "type.yaml")], "'floaty'"),
        "space low > high": (["--space", str(tmp / "bounds.yaml")], "low <= high"),
        "space bad when": (["--space", str(tmp / "when.yaml")], "'freeze'"),
        "space empty": (["--space", str(tmp / "empty.yaml")], "non-empty mapping"),
        "max epochs 0": (["--max-epochs", "0"], "--max-epochs"),
        "image size 8": (["--image-size", "8"], "--image-size"),
        "device unknown": (["--device", "tpu"], "--device"),
        "timeout negative": (["--timeout", "-5"], "--timeout"),
        "timeout infinite": (["--timeout", "inf"], "--timeout"),
        "seed negative": (["--seed", "-1"], "--seed"),
        "val fraction 0": (["--val-fraction", "0"], "--val-fraction"),
    }


BAD_INPUT_CASES = [
    "weights missing", "weights corrupt", "weights zero bytes", "space file missing", "space preset unknown",
    "space yaml syntax", "space unknown type", "space low > high", "space bad when", "space empty", "max epochs 0",
    "image size 8", "device unknown", "timeout negative", "timeout infinite", "seed negative", "val fraction 0",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_clear_error_and_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    extra, phrase = _bad_input_cases(tmp_path)[case]
    data = make_image_folder(tmp_path / "data", per_class=3)
    pretrained = [] if "--weights" in extra else ["--no-pretrained"]
    code = autoft.cli.main(["search", "--model", "test_resnet", *pretrained, "--data", str(data),
                            "--run-dir", str(tmp_path / "run"), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err and phrase in " ".join(err.split())


def test_an_unknown_choice_is_rejected_by_the_parser_with_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        autoft.cli.main(["search", "--model", "test_resnet", "--data", "d", "--sampler", "grid"])
    assert exit_.value.code == 2 and "invalid choice: 'grid'" in capsys.readouterr().err


@pytest.mark.slow
def test_odd_images_end_to_end_unreadable_skipped_with_a_count_and_text_ignored(tmp_path: Path) -> None:
    from PIL import Image

    data = make_image_folder(tmp_path / "data", per_class=6, size=(16, 16))
    cat, dog, fish = (data / "train" / c for c in ("cat", "dog", "fish"))
    Image.new("L", (16, 16), 90).save(cat / "gray.png")
    Image.new("RGBA", (16, 16), (200, 10, 10, 128)).save(cat / "rgba.png")
    Image.new("I;16", (16, 16), 40000).save(dog / "deep.png")
    Image.new("P", (16, 16), 3).save(dog / "palette.gif")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(fish / "whole.jpg")
    (fish / "truncated.jpg").write_bytes((fish / "whole.jpg").read_bytes()[:100])
    (fish / "zero.png").write_bytes(b"")
    (cat / "corrupt.png").write_bytes(b"\x89PNG not really")
    (dog / "notes.txt").write_text("not an image")
    done = subprocess.run(
        [sys.executable, "-m", "autoft", "search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
         "--trials", "1", "--max-epochs", "1", "--image-size", "16", "--run-dir", str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Skipped 3 unreadable image file(s)" in " ".join(done.stderr.split())
    assert "notes.txt" not in done.stderr


# ----------------------------------------------------------------------------- security


OFFLINE_PROBE = """
import sys
attempts = []
NET = ("socket.connect", "socket.getaddrinfo")
sys.addaudithook(lambda event, args: attempts.append(event) if event in NET else None)
import autoft.tasks.image.models
try:
    autoft.tasks.image.models.create("resnet18", num_classes=2, pretrained=True)
except autoft.AutoftError as exc:
    print("AutoftError:", exc)
print("network attempts:", len(attempts))
"""


def test_hf_hub_offline_means_no_network_attempt(tmp_path: Path) -> None:
    env = _env() | {"HF_HOME": str(tmp_path / "hf")}  # an empty cache: the weights are not there
    done = subprocess.run([sys.executable, "-c", OFFLINE_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert "AutoftError: Pretrained weights could not be fetched" in done.stdout, done.stderr
    assert "network attempts: 0" in done.stdout
