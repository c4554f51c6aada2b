"""The Ray Tune backend on real Ray: an in-process cluster, two nodes started by `ray start`, a killed driver."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import ray
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

import autoft
from autoft import results
from autoft.backends import ray as ray_backend
from autoft.trial import EpochMetrics, Report, TrialOutcome
from conftest import make_image_folder

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = {"pretrained": False, "image_size": 16, "max_epochs": 4, "priors": False}  # the seeded searches as pinned
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = os.environ | {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # a throwaway cluster on localhost; docs/cluster.md covers tokens
    "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True, noise=90)


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A cluster per test: a module-wide one stayed up beside the two-node cluster and the killed driver's trials,
    and on 2 cores the driver-killed test's timing no longer held (3 CI runs failed it)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as ENV: no token written to this user's ~/.ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def shape(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.value, t.intermediate_values) for t in study.trials]


def test_ray_search_records_pruned_trials_and_matches_local(local_ray: None, data: Path, tmp_path: Path) -> None:
    # Seed 2: the median pruner stops trial 3 (the same under both backends, one trial at a time).
    on_ray = autoft.search(
        "test_resnet", data, trials=5, run_dir=tmp_path / "ray", seed=2, backend="ray", max_concurrent=1, **TINY
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray worker with one CPU: same arithmetic, same numbers
    try:
        local = autoft.search("test_resnet", data, trials=5, run_dir=tmp_path / "local", seed=2, **TINY)
    finally:
        torch.set_num_threads(threads)
    assert shape(on_ray.study) == shape(local.study)

    pruned = on_ray.study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "the median pruner must stop a trial under Ray too"
    for trial in pruned:
        assert len(trial.intermediate_values) < trial.params["epochs"]
        assert trial.user_attrs["node_id"] and len(trial.user_attrs["val_loss"]) == len(trial.intermediate_values)
    meta = json.loads((on_ray.model_dir / "config.json").read_text())
    assert meta["trial"] == on_ray.best_trial and on_ray.study.trials[meta["trial"]].state == TrialState.COMPLETE
    tuned = autoft.load_model(on_ray.model_dir)
    files = sorted((data / "test").glob("*/*.png"))
    accuracy = sum(p == f.parent.name for p, f in zip(tuned.predict(files), files, strict=True)) / len(files)
    assert accuracy == pytest.approx(on_ray.test_score)
    assert not list((tmp_path / "ray").rglob("checkpoint_*")), "trials keep no checkpoints of their own"


def test_trial_raising_on_a_worker_is_recorded_fail_with_its_error(local_ray: None, data: Path, tmp_path: Path) -> None:
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("params:\n  lr: {type: float, low: 0.1, high: 0.2}\n  label_smoothing: 1.5\n")
    with pytest.raises(autoft.AutoftError, match="label_smoothing"):
        autoft.search("test_resnet", data, trials=6, space=str(bad_space), run_dir=tmp_path / "run", backend="ray",
                      max_concurrent=1, **TINY)  # fmt: skip
    study = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3  # the same error 3 times stops the search
    assert "label_smoothing" in study.trials[0].user_attrs["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(*args: str) -> subprocess.Popen:
    """`ray start --block` in its own process group, so the test ends exactly the processes it started."""
    ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")  # fmt: skip
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args]
    command += [f"{flag}={free_port()}" for flag in ports]
    return subprocess.Popen(
        command, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    """A Ray cluster of two nodes on this machine, one CPU each, told apart by their own resources."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray")
    head = ray_node("--head", f"--port={port}", "--num-cpus=1",
                    '--resources={"node_a": 1}', "--include-dashboard=false", f"--temp-dir={temp}")  # fmt: skip
    address = f"127.0.0.1:{port}"
    wait_for_node(address, "node_a", head)
    second = ray_node(f"--address={address}", "--num-cpus=1", '--resources={"node_b": 1}')
    wait_for_node(address, "node_b", second)
    yield address
    for node in (second, head):  # each node's process group: `ray start` and every process it started
        os.killpg(node.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def wait_for_node(address: str, resource: str, node: subprocess.Popen, limit: float = 120) -> None:
    """Until ``ray status`` shows the node's own ``resource`` in the cluster at ``address``. A fixed sleep was not
    enough: an idle head took 11.6 s to show its resource here, and a CI run on a busy machine once found no GCS."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and node.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={address}"],
                                    env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
            if status.returncode == 0 and resource in status.stdout:
                return
        time.sleep(1)
    pytest.fail(f"the Ray node with {resource} did not join the cluster at {address} (exit {node.poll()})")


def _count(db: Path, query: str) -> int:
    """A ``SELECT COUNT(*)`` over the study database ``db``, read without writing; 0 while there is no file, no
    tables yet, or the writer holds the lock (a CI run once had the test's ``load_study`` create the schema at the
    same moment as the driver: UNIQUE constraint failed)."""
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as connection:
            return int(connection.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def _has_a_study(db: Path) -> bool:
    """Whether the driver has created ``db``'s schema and a study in it."""
    return _count(db, "SELECT COUNT(*) FROM studies") > 0


def _running_trials(db: Path) -> int:
    """How many trials ``db``'s study holds as RUNNING (0 while it has none or no schema)."""
    return _count(db, "SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'")


def wait_for(db: Path, condition: Callable[[list[FrozenTrial]], bool], *, poll: float, limit: float = 240) -> None:
    """Read the study in ``db`` (as another process writes it) until ``condition`` holds for its trials."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(poll)
        if not _has_a_study(db):  # Optuna's storage creates a missing schema: opening it earlier races the driver's
            continue
        try:
            trials = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{db}").trials
        except (KeyError, sqlalchemy.exc.OperationalError):  # not created yet, or locked by the writer
            continue
        if condition(trials):
            return
    pytest.fail(f"the study in {db} never reached the state the test waits for")


def search_command(data: Path, address: str, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autoft", "search", "--model", "test_resnet", "--no-pretrained", "--data",
            str(data), "--image-size", "16", "--max-epochs", "3", "--trials", str(trials), "--seed", "5",
            "--address", address, "--cpus-per-trial", "1", *extra]  # fmt: skip


def test_search_with_address_runs_trials_on_both_nodes(two_nodes: str, data: Path, tmp_path: Path) -> None:
    done = subprocess.run(search_command(data, two_nodes, 3), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(
        study_name="test_resnet-data", storage=f"sqlite:///{tmp_path}/runs/test_resnet-data/study.db"
    )
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["node_id"] for t in study.trials}) == 2, "one CPU per node: trials must use both nodes"


def test_driver_killed_mid_search_then_resumed(two_nodes: str, data: Path, tmp_path: Path) -> None:
    # Trials of 100 epochs (about 7 s here): with the default space's 3 a fast CI machine ran a trial inside one
    # poll of the study, so "one ended, one running" was never seen and the test waited out its 240 s.
    (tmp_path / "space.yaml").write_text(SLOW_SPACE.replace("epochs: 40", "epochs: 100"))
    command = search_command(data, two_nodes, 4, "--space", str(tmp_path / "space.yaml"), "--max-epochs", "100",
                             "--pruner", "none")  # fmt: skip
    storage = f"sqlite:///{tmp_path}/runs/test_resnet-data/study.db"
    driver = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def one_ended_one_running(trials: list[FrozenTrial]) -> bool:
        states = [t.state for t in trials]
        # Running with its knobs: all its parameters drawn (a trial killed while they are written is not retried).
        running = any(t.state == TrialState.RUNNING and "knobs" in t.user_attrs for t in trials)
        return states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) >= 1 and running

    wait_for(tmp_path / "runs" / "test_resnet-data" / "study.db", one_ended_one_running, poll=0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = optuna.load_study(study_name="test_resnet-data", storage=storage).trials
    finished = {t.number: t.params for t in before if t.state.is_finished()}
    interrupted = [t.number for t in before if t.state == TrialState.RUNNING and "knobs" in t.user_attrs]
    assert finished and interrupted, "the driver must be killed between trials' ends"

    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="test_resnet-data", storage=storage)
    assert {n: study.trials[n].params for n in finished} == finished  # kept, not re-run
    for number in interrupted:
        assert study.trials[number].state == TrialState.FAIL and study.trials[number].user_attrs["interrupted"]
    assert results.finished_count(study) == 4 and not study.get_trials(states=(TrialState.RUNNING,))
    retried = [t.params for t in study.trials[len(before) :]]
    lost = {n: study.trials[n].params for n in interrupted if study.trials[n].params not in retried}
    assert not lost, f"interrupted parameters not run again: {lost}; the runs after the resume: {retried}"
    assert autoft.load_model(tmp_path / "runs" / "test_resnet-data" / "best").meta["trial"] == study.best_trial.number


def _pids_titled(word: str) -> list[int]:
    """Processes whose command line (Ray sets it to the actor's name) contains ``word``."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and word in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
    return pids


def test_a_worker_that_dies_is_recorded_fail_and_the_search_goes_on(
    local_ray: None, data: Path, tmp_path: Path
) -> None:
    killed: list[int] = []
    db = tmp_path / "run" / "study.db"

    def kill_the_first_trials_worker() -> None:  # SIGKILL, as the kernel's OOM killer would
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            # Only once the trial is in the study: a worker killed before Tune's trial start (when the driver asks
            # Optuna) never had a trial to fail, and the search rightly records nothing (a CI run on 2 cores did).
            pids = _pids_titled("ray::ImplicitFunc") if _running_trials(db) else []
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_trials_worker, daemon=True)
    killer.start()
    result = autoft.search(
        "test_resnet", data, trials=3, run_dir=tmp_path / "run", backend="ray", max_concurrent=1, warm_start=False,
        **TINY,
    )  # fmt: skip
    killer.join()
    assert killed, "no trial worker process was found to kill"
    states = [t.state for t in result.study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) >= 1
    failed = next(t for t in result.study.trials if t.state == TrialState.FAIL)
    assert failed.user_attrs["error"].startswith("RayError")


def test_a_study_started_locally_continues_on_ray_and_back(local_ray: None, data: Path, tmp_path: Path) -> None:
    options = TINY | {"run_dir": tmp_path / "run", "warm_start": False, "max_epochs": 2}
    local = autoft.search("test_resnet", data, trials=2, **options)
    first = [(t.number, t.state, t.params) for t in local.study.trials]
    on_ray = autoft.search("test_resnet", data, trials=3, backend="ray", max_concurrent=1, **options)
    assert [(t.number, t.state, t.params) for t in on_ray.study.trials][:2] == first  # kept, not re-run
    back = autoft.search("test_resnet", data, trials=4, **options)
    assert len(back.study.trials) == 4 and results.finished_count(back.study) == 4


# ----------------------------------------------------------------------------- parity with the local backend

# Every trial trains 40 epochs of 3 steps (no pruning, no portfolio), so a signal lands while trials run.
SLOW_SPACE = """params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  optimizer: adamw
  epochs: 40
  batch_size: 8
"""


def test_a_trial_its_worker_stopped_for_the_budget_is_complete_with_its_note(local_ray: None, tmp_path: Path) -> None:
    def budget_stopped_worker(number: int, params: dict, report: Report) -> TrialOutcome:  # local: shipped by value
        """Two epochs, then ended by the time budget, as the search's worker returns such a trial."""
        history = []
        for epoch in range(2):
            history.append(EpochMetrics(epoch, train_loss=1, val_loss=1, val_accuracy=0.5 + epoch / 10, seconds=0.1))
            report(epoch, history[-1])
        return TrialOutcome(best_score=0.6, best_epoch=1, history=history, notes={"stopped_by_budget": "epoch 2 of 9"})

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    kept: list[int] = []
    ray_backend.optimize(
        study, autoft.load_space("default"), budget_stopped_worker, lambda number, params, outcome: kept.append(number),
        cluster=ray_backend.Cluster(max_concurrent=1, storage_path=tmp_path / "ray"), n_trials=2, timeout=None,
        on_trial_end=lambda trial: None, should_stop=lambda study: False,
    )  # fmt: skip
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 and sorted(kept) == [0, 1]
    assert all(t.user_attrs["stopped_by_budget"] == "epoch 2 of 9" and t.value == 0.6 for t in study.trials)


def test_a_timed_search_on_ray_records_only_trials_that_ran(local_ray: None, data: Path, tmp_path: Path) -> None:
    started = datetime.now()
    # No trial may start after the launch window (one epoch before the search's share of --timeout ends) but the
    # first (as in the local backend); Tune's trial that was waiting for a worker then runs nothing and leaves no
    # trial: none FAIL "not run" or WAITING.
    result = autoft.search("test_resnet", data, timeout=30, run_dir=tmp_path / "run", backend="ray", warm_start=False,
                           **TINY)  # fmt: skip
    budget = result.study.user_attrs["plan"]["budget"]
    window_end = started + timedelta(seconds=budget["spent"] + budget["search"] - budget["epoch_seconds"] + 1)
    trials = result.study.trials
    assert trials and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(t.intermediate_values for t in trials) and all(t.datetime_start <= window_end for t in trials[1:])
