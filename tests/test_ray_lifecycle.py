"""Ray's lifetime around a search: started for one search and stopped at its end, without taking the search's
signal handlers or log records; Ctrl-C on a driver that started its own. Apart from test_ray.py, whose
two-node cluster (module-wide) would already be running."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

import autoft
from autoft import results
from autoft.backends import ray as ray_backend
from conftest import make_image_folder
from test_ray import ENV, SLOW_SPACE, TINY, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True, noise=90)


def test_starting_ray_keeps_the_searchs_signal_handlers_and_hands_its_log_records_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop_after_the_step(signum: int, frame: object) -> None:  # stands for the controller's handler
        pass

    try:
        for s in handlers:
            signal.signal(s, stop_after_the_step)
        ray_backend._connect(None)  # ray.init installs SIGTERM handlers that exit at once
        assert signal.getsignal(signal.SIGINT) is stop_after_the_step
        assert signal.getsignal(signal.SIGTERM) is stop_after_the_step
        ray_logger = logging.getLogger("ray")  # Ray's records go where the CLI sends them (search.log; -v: terminal)
        assert ray_logger.propagate and not ray_logger.handlers
    finally:
        ray.shutdown()
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_a_search_that_started_ray_stops_it_at_its_end(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Ray started for one search (no cluster given) leaves with it: no workers or object store left behind to
    hold memory or collide with the next cluster on this machine."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not ray.is_initialized()
    result = autoft.search("test_resnet", data, trials=1, run_dir=tmp_path / "run", backend="ray", **TINY)
    assert result.study.trials[0].state == TrialState.COMPLETE
    assert not ray.is_initialized()


def test_ctrl_c_records_the_running_trials_interrupted_and_the_same_command_resumes(data: Path, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SLOW_SPACE)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "autoft", "search", "--model", "test_resnet", "--no-pretrained", "--data",
               str(data), "--space", str(tmp_path / "space.yaml"), "--trials", "2", "--image-size", "16", "--pruner",
               "none", "--max-epochs", "40", "--run-dir", str(run), "--backend", "ray"]  # fmt: skip
    # As a new user runs it: Ray's token-authentication default is on (its token goes to this HOME), so Ray
    # prints its start-up warning; without -v it belongs in search.log, not on the terminal.
    env = {k: v for k, v in ENV.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path), "COLUMNS": "200"}
    # A session of its own: the SIGINT goes to the driver's whole process group, as Ctrl-C in a terminal does.
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(run / "study.db", lambda trials: any(t.intermediate_values for t in trials), poll=0.2, limit=120)
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert "Tuner.restore" not in out + err, "autoft resumes from its study, never with Ray's Tuner.restore"
    assert "Token authentication" not in err and "Token authentication" in (run / "search.log").read_text()
    study = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{run / 'study.db'}")
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    assert all(t.state.is_finished() and "error" not in t.user_attrs for t in study.trials)  # none left RUNNING/WAITING
    assert (run / "report.html").is_file() and "interrupted" in (run / "trials.csv").read_text()

    again = subprocess.run([*command, "-v"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Token authentication" in " ".join(again.stderr.split()), "with -v Ray's warnings reach the terminal"
    study = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{run / 'study.db'}")
    retried = {t.user_attrs.get("retry_of"): t for t in study.trials}
    for trial in interrupted:  # each interrupted trial's parameters ran again, to the end
        assert retried[trial.number].params == trial.params and retried[trial.number].state.is_finished()
    assert results.finished_count(study) == 2 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
