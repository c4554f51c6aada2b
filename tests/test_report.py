"""The study report: its plain data on hand-made studies, the edge cases, and the page in a real browser."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

import autoft
from autoft import figures, report
from autoft.cli import main
from autoft.export import Evaluation
from conftest import make_image_folder

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "epochs": IntDistribution(1, 4),
    "freeze": CategoricalDistribution(["full", "linear_probe"]),
}


def _trial(number: int, state: TrialState = TrialState.COMPLETE, curve: tuple[float, ...] = (0.4, 0.6)):
    params = {"lr": 10 ** -(1 + number % 4), "epochs": 1 + number % 4, "freeze": ["full", "linear_probe"][number % 2]}
    return create_trial(
        state=state,
        value=max(curve, default=0.5) if state == TrialState.COMPLETE else None,
        params=params,
        distributions=DISTRIBUTIONS,
        intermediate_values=dict(enumerate(curve)),
        user_attrs={"error": "ValueError: boom"} if state == TrialState.FAIL else {},
    )


def make_run(run_dir: Path, trials: list, *, directions: tuple[str, ...] = ("maximize",)) -> Path:
    """A run folder as a search leaves it (config.yaml + SQLite study), holding the given trials."""
    run_dir.mkdir(parents=True)
    storage = f"sqlite:///{run_dir / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", directions=list(directions))
    for t in trials:
        study.add_trial(t)
    config = {"model": "test_resnet", "data": str(run_dir / "missing"), "study_name": "s", "storage": storage}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config | {"trials": len(trials), "pretrained": False}))
    return run_dir


def test_history_curves_and_table_come_from_the_study(tmp_path: Path) -> None:
    trials = [_trial(0, curve=(0.3, 0.5)), _trial(1, TrialState.PRUNED, (0.2,)), _trial(2, curve=(0.6, 0.4))]
    _, study = report.load_study(make_run(tmp_path / "run", trials))
    assert figures.history_data(study) == {"numbers": [0, 2], "values": [0.5, 0.6], "best_so_far": [0.5, 0.6]}
    curves = figures.curves_data(study)
    assert [(c["number"], c["state"], c["values"]) for c in curves] == [
        (0, "COMPLETE", [0.3, 0.5]),
        (1, "PRUNED", [0.2]),
        (2, "COMPLETE", [0.6, 0.4]),
    ]
    assert curves[1]["planned_epochs"] == 2  # the pruned trial was cut short of its planned epochs
    rows = figures.trials_table(study)
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert rows[1]["param_freeze"] == "linear_probe" and rows[1]["strategy"].startswith("linear probe")


def test_importances_rank_the_parameters_that_vary(tmp_path: Path) -> None:
    trials = [_trial(n, curve=(0.1 * (n % 4) + 0.2,)) for n in range(8)]
    _, study = report.load_study(make_run(tmp_path / "run", trials))
    importances, why = figures.importance_data(study)
    assert why == "" and set(importances) == {"lr", "epochs", "freeze"}
    assert list(importances.values()) == sorted(importances.values(), reverse=True)
    assert sum(importances.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("trials", "reason"),
    [
        ([_trial(0)], "at least 2 complete trials; this study has 1"),
        ([_trial(0, TrialState.FAIL, ()), _trial(1, TrialState.FAIL, ())], "this study has 0"),
        ([_trial(0, curve=(0.3,)), _trial(4, curve=(0.7,))], "none did"),  # trials 0 and 4 chose the same parameters
        ([_trial(0, curve=(0.5,)), _trial(1, curve=(0.5,))], "every complete trial scored the same"),
    ],
)
def test_importances_say_why_they_cannot_be_computed(tmp_path: Path, trials: list, reason: str) -> None:
    _, study = report.load_study(make_run(tmp_path / "run", trials))
    importances, why = figures.importance_data(study)
    assert importances == {} and reason in why


def test_confident_mistakes_are_the_wrong_answers_surest_first() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    mistakes = figures.confident_mistakes(probabilities, labels, ("a", "b"))
    assert [(m["index"], m["true"], m["predicted"]) for m in mistakes] == [(4, "b", "a"), (1, "a", "b"), (2, "b", "a")]
    assert [m["confidence"] for m in mistakes] == [0.95, 0.8, 0.6]


def test_evaluation_counts_per_class_and_confusion() -> None:
    result = Evaluation.from_predictions(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert result.confusion == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert result.accuracy == pytest.approx(0.6) and result.count == 5
    assert result.per_class == {"a": 0.5, "b": pytest.approx(2 / 3), "c": None}


@pytest.mark.parametrize(
    ("trials", "says"),
    [
        ([_trial(0)], "at least 2 complete trials; this study has 1"),
        ([_trial(0, TrialState.FAIL, ())], "No trial completed"),
        ([_trial(0, curve=()), _trial(1, curve=())], "no intermediate values"),
        ([], "The study has no trials yet"),
    ],
    ids=["one-trial", "only-failed", "no-curves", "empty"],
)
def test_report_of_a_thin_study_says_what_is_missing(tmp_path: Path, trials: list, says: str) -> None:
    run = make_run(tmp_path / "run", trials)
    page = report.write_report(run).read_text()
    assert says in page and "No model was exported" in page
    assert page.count("<script id='plotly-js'>") == 1 and "<script src" not in page  # inlined once, no network


def test_several_objectives_get_a_pareto_front(tmp_path: Path) -> None:
    trials = [
        create_trial(values=[v, 1 - v], params={"lr": v}, distributions={"lr": FloatDistribution(0, 1)})
        for v in (0.1, 0.5, 0.9)
    ]
    built = report.build_report(make_run(tmp_path / "run", trials, directions=("maximize", "minimize")))
    assert "pareto_front" in built.figures and "history" not in built.figures
    assert built.summary["best_trial"] is None


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real search, in a real browser


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> autoft.SearchResult:
    """One tiny real search (shared by the slow tests below): 4 trials of test_resnet at 16 px."""
    root = tmp_path_factory.mktemp("search")
    data = make_image_folder(root / "data", per_class=8, size=(16, 16), with_test=True, noise=90)
    return autoft.search(
        "test_resnet", data, trials=4, run_dir=root / "run", seed=2, pretrained=False, image_size=16, max_epochs=3
    )


# Records JavaScript errors (thrown or console.error) and, after load, how many Plotly graphs drew an SVG.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
var __consoleError = console.error;
console.error = function () {
  window.__errors.push(Array.from(arguments).join(' ')); __consoleError.apply(console, arguments); };
window.addEventListener('load', function () { setTimeout(function () {
  var out = document.createElement('pre'); out.id = 'probe';
  var plots = document.querySelectorAll('.js-plotly-plot');
  out.textContent = JSON.stringify({errors: window.__errors,
    divs: document.querySelectorAll('.plotly-graph-div').length,
    rendered: Array.from(plots).filter(function (p) { return p.querySelector('svg.main-svg'); }).length});
  document.body.appendChild(out); }, 300); });
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium offline: no network services, no sandbox (CI containers run as root)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=15000"]  # fmt: skip
    return subprocess.run(["chromium", *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (make test installs it)")
def test_report_written_by_the_search_renders_every_figure_in_a_browser(
    searched: autoft.SearchResult, tmp_path: Path
) -> None:
    page = searched.run_dir / "report.html"
    text = page.read_text()
    for section in ("Summary", "Optimization history", "Learning curves", "Parameter importances", "Timeline",
                    "Parallel coordinates", "Slice", "Contour of", "Best model on test", "Most confidently wrong",
                    "All trials", searched.best_recipe.describe()):  # fmt: skip
        assert section in text, section
    figures = len(re.findall(r'<div id="figure-', text))
    assert figures >= 9  # 7 of the study, then the best model's confusion matrix and per-class scores on test
    assert "Best model on validation" not in text  # the data has a test split: the model is shown on it alone

    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    dom = chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile").stdout
    state = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1))
    assert state == {"errors": [], "divs": figures, "rendered": figures}

    shot = tmp_path / "report.png"
    chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri(),
             profile=tmp_path / "profile")  # fmt: skip
    assert shot.stat().st_size > 20_000


@pytest.mark.slow
def test_the_trials_table_and_summary_match_the_study(searched: autoft.SearchResult) -> None:
    summary = json.loads((searched.run_dir / "report.json").read_text())
    assert summary["best_trial"] == searched.best_trial and summary["trials"] == 4
    assert summary["test_score"] == pytest.approx(searched.test_score)
    assert summary["evaluations"]["test"]["accuracy"] == pytest.approx(searched.test_score)
    assert summary["counts"] == {"classes": 3, "train": 24, "val": 6, "test": 6, "image_size": 16, "skipped": 0}
    text = (searched.run_dir / "report.html").read_text()
    assert text.count('<tr class="') == 4  # one row per trial


@pytest.mark.slow
def test_a_report_given_the_test_logits_predicts_only_the_rest(searched: autoft.SearchResult, monkeypatch) -> None:
    """The search's wrap-up loads and evaluates the exported model once: the report reuses its test logits, and
    with a test split it shows the best model on test alone (validation's score is the study's)."""
    calls, original = [], report.predict_logits

    def recording(model, split, *args, **kwargs):
        calls.append(original(model, split, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(report, "predict_logits", recording)
    standalone = report.build_report(searched.run_dir).summary["evaluations"]
    assert len(calls) == 1 and set(standalone) == {"test"}  # test alone: the data has a test split
    tuned = autoft.load_model(searched.model_dir)
    given = report.build_report(searched.run_dir, tuned=tuned, logits={"test": calls[0]}).summary["evaluations"]
    assert len(calls) == 1  # nothing predicted again
    assert given["test"].accuracy == standalone["test"].accuracy == pytest.approx(searched.test_score)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_serves_the_study_on_loopback(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [_trial(0), _trial(1)])
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "autoft", "dashboard", str(run), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if importlib.util.find_spec("optuna_dashboard") is None:  # an install without the report extra (a GPU image)
        output, _ = server.communicate(timeout=60)
        assert server.returncode == 2 and "pip install 'autoft[report]'" in output, output
        return
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
        assert answer is not None, "the dashboard did not answer on 127.0.0.1"
        assert [s["study_name"] for s in answer["study_summaries"]] == ["s"]
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=10)
    assert f"http://127.0.0.1:{port}/" in output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (make test installs it)")
def test_png_writes_every_figure(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [_trial(0, curve=(0.2, 0.4)), _trial(1, TrialState.PRUNED, (0.1,))])
    assert main(["report", str(run), "--png"]) == 0
    pngs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert pngs == ["history.png", "learning_curves.png", "timeline.png"]
    assert all((run / "figures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
