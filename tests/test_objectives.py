"""Several objectives: parsing, the Pareto front and its knee, pruning on the accuracy curve, the kept models."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import autoft
from autoft import objectives
from autoft.cli import main
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.keeper import RunFolder
from autoft.objectives import EpochReports, ParetoPoint, knee, pareto_front
from autoft.preparation import prepare
from autoft.study import create_pruner, open_study
from autoft.trial import TrialOutcome
from conftest import make_image_folder

ACC_PARAMS = ("accuracy", "params")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("accuracy", ("accuracy",)),
        ("accuracy,params", ("accuracy", "params")),
        (" accuracy , latency ", ("accuracy", "latency")),
        (["accuracy", "params", "latency"], ("accuracy", "params", "latency")),
    ],
)
def test_objectives_parse(text: str | list[str], expected: tuple[str, ...]) -> None:
    assert objectives.parse_objectives(text) == expected
    assert objectives.directions(expected)[0] == "maximize"
    assert set(objectives.directions(expected)[1:]) <= {"minimize"}


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("accuracy,size", "unknown objective(s) ['size']"),
        ("params,accuracy", "must start with accuracy"),
        ("accuracy,params,params", "name each objective once"),
        ("", "unknown objective(s) ['']"),
        (3, "--objective must be names"),
    ],
)
def test_bad_objectives_are_one_clear_error_listing_the_choices(text: object, phrase: str) -> None:
    with pytest.raises(AutoftError, match="--objective") as error:
        SearchConfig(model="test_resnet", data=Path("data"), objectives=text)
    assert phrase in str(error.value)
    assert "accuracy,params" in str(error.value) or "names" in str(error.value)


def test_keep_top_with_several_objectives_is_refused() -> None:
    with pytest.raises(AutoftError, match="--keep-top ranks one objective"):
        SearchConfig(model="test_resnet", data=Path("data"), objectives="accuracy,params", keep_top=3)


def test_bad_objective_on_the_command_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["search", "--model", "test_resnet", "--data", str(tmp_path), "--objective", "accuracy,speed"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "accuracy,latency" in err and "speed" in err


def test_pareto_front_keeps_the_non_dominated_points() -> None:
    points = [
        ParetoPoint(0, (0.50, 100.0)),
        ParetoPoint(1, (0.90, 300.0)),
        ParetoPoint(2, (0.85, 120.0)),
        ParetoPoint(3, (0.80, 200.0)),  # dominated by 2: less accurate and bigger
        ParetoPoint(4, (0.90, 300.0)),  # equal to 1: neither dominates the other
    ]
    assert [p.trial for p in pareto_front(points, ACC_PARAMS)] == [1, 4, 2, 0]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # The knee: 0.93 at a fifth of the size of the most accurate point.
        ([(0.95, 100.0), (0.93, 20.0), (0.50, 10.0)], 1),
        # All on the line through the extremes: the most accurate wins the tie.
        ([(1.0, 30.0), (0.5, 20.0), (0.0, 10.0)], 0),
        # One or two points: the most accurate.
        ([(0.7, 10.0), (0.9, 50.0)], 1),
        ([(0.7, 10.0)], 0),
        # A constant objective (one model size) says nothing: the most accurate.
        ([(0.7, 10.0), (0.9, 10.0), (0.8, 10.0)], 1),
    ],
)
def test_knee_on_given_numbers(values: list[tuple[float, float]], expected: int) -> None:
    front = [ParetoPoint(i, v) for i, v in enumerate(values)]
    assert knee(front, ACC_PARAMS).trial == expected


def test_knee_with_three_objectives_takes_the_best_balance() -> None:
    names = ("accuracy", "params", "latency")
    front = [ParetoPoint(0, (0.96, 900.0, 9.0)), ParetoPoint(1, (0.94, 200.0, 2.0)), ParetoPoint(2, (0.6, 100.0, 1.0))]
    assert knee(front, names).trial == 1


def test_costs_count_parameters_and_time_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    example = torch.zeros(1, 3, 16, 16)
    first = objectives.costs(model, ("accuracy", "params", "latency"), example=example)
    assert first["params"] == 3 * 4 * 9 + 4 and first["latency_ms"] > 0
    calls = []
    monkeypatch.setattr(objectives.time, "perf_counter", lambda: calls.append(1) or 0.0)
    again = objectives.costs(model, ("accuracy", "latency"), example=example)
    assert again == {"latency_ms": first["latency_ms"]} and not calls  # cached per architecture, size and device


def _mo_study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], pruner=pruner)
    for curve in ([0.6, 0.7, 0.8], [0.6, 0.8, 0.9], [0.5, 0.7, 0.9]):
        study.add_trial(create_trial(values=[curve[-1], 10.0], user_attrs={"val_accuracy": curve}))
    return study


def test_the_pruner_judges_the_accuracy_curve_of_a_multi_objective_trial() -> None:
    study = _mo_study(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    epochs = EpochReports(study)
    weak, strong = study.ask(), study.ask()
    assert epochs.report(weak, 0, 0.1) is False  # warm-up step: never pruned
    assert epochs.report(strong, 0, 0.9) is False
    assert epochs.report(weak, 1, 0.2) is True  # below the median 0.7 of the finished trials at epoch 1
    assert epochs.report(strong, 1, 0.95) is False
    assert study.trials[weak.number].user_attrs["val_accuracy"] == [0.1, 0.2]
    assert study.trials[weak.number].intermediate_values == {}  # see EpochReports: TPE would fail on them

    study.tell(weak, state=TrialState.PRUNED)
    sampler = optuna.samplers.TPESampler(n_startup_trials=1, seed=0)
    follow = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    x = {"x": FloatDistribution(0, 1)}
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        kept = {"intermediate_values": t.intermediate_values, "params": {"x": 0.5}, "distributions": x}
        follow.add_trial(create_trial(state=t.state, values=t.values, **kept))
    assert 0 <= follow.ask().suggest_float("x", 0, 1) <= 1  # a pruned multi-objective trial does not break TPE


def test_one_objective_reports_as_before() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
    trial = study.ask()
    assert EpochReports(study).report(trial, 0, 0.5) is False
    assert study.trials[0].intermediate_values == {0: 0.5}


def _outcome(accuracy: float, params: float, state: dict[str, torch.Tensor]) -> TrialOutcome:
    return TrialOutcome(best_score=accuracy, best_epoch=0, notes={"params": params}, best_state=state)


@pytest.mark.slow
def test_front_models_are_kept_and_the_knee_is_best(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, size=(16, 16))
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, objectives=ACC_PARAMS, run_dir=tmp_path / "r"
    ).resolved()
    cfg.run_dir.mkdir()
    setup = prepare(cfg)
    study = open_study(cfg)
    folder = RunFolder(cfg, {cfg.model: setup}, study)
    state = setup.base_model.state_dict()

    def run(accuracy: float, params: float) -> None:
        trial = study.ask()
        folder.keep(trial.number, {"epochs": 1}, _outcome(accuracy, params, state))  # as the local backend does
        study.tell(trial, [accuracy, params])

    def kept() -> tuple[list[str], int]:
        best = json.loads((cfg.run_dir / "best" / "config.json").read_text())["trial"]
        return sorted(p.name for p in (cfg.run_dir / "pareto").iterdir()), best

    run(0.5, 100)
    run(0.9, 300)
    assert kept() == (["trial-0000", "trial-0001"], 1)  # two points: the most accurate
    run(0.85, 120)
    assert kept() == (["trial-0000", "trial-0001", "trial-0002"], 2)  # the knee
    run(0.8, 200)  # dominated by trial 2: no model written
    run(0.95, 110)  # dominates trials 1 and 2: their models go
    assert kept() == (["trial-0000", "trial-0004"], 4)
    meta = json.loads((cfg.run_dir / "best" / "config.json").read_text())
    assert meta["objectives"] == {"accuracy": 0.95, "params": 110}


@pytest.mark.slow
def test_two_objective_search_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True, noise=90)
    run = tmp_path / "run"
    args = ["search", "--model", "test_resnet,test_vit", "--no-model-selection", "--no-pretrained", "--data", str(data)]
    args += ["--run-dir", str(run), "--trials", "4", "--max-epochs", "2", "--image-size", "16"]
    assert main([*args, "--objective", "accuracy,latency"]) == 0
    out = capsys.readouterr().err
    study = optuna.load_study(study_name="test_resnet-test_vit-data", storage=f"sqlite:///{run / 'study.db'}")
    assert len(study.directions) == 2 and study.user_attrs["objectives"] == ["accuracy", "latency"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete and all(t.values[1] == t.user_attrs["latency_ms"] > 0 for t in complete)
    assert {t.params["model"] for t in complete} == {"test_resnet", "test_vit"}  # the costs differ by model
    front = pareto_front([ParetoPoint(t.number, tuple(t.values)) for t in complete], ("accuracy", "latency"))
    assert sorted(p.name for p in (run / "pareto").iterdir()) == sorted(f"trial-{p.trial:04d}" for p in front)
    meta = json.loads((run / "best" / "config.json").read_text())
    assert meta["trial"] == knee(front, ("accuracy", "latency")).trial and "test_accuracy" in meta
    assert "Pareto front" in out and f"best/ is trial {meta['trial']}" in out and "Pruning:" in out
    page = (run / "report.html").read_text()
    assert "(knee)" in page and "How best/ was chosen" in page  # the star on the front, and the rule
    assert autoft.load_model(run / "best").meta["trial"] == meta["trial"]
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert all(int(r["epochs_run"]) > 0 for r in rows if r["state"] == "COMPLETE")  # the curve lives in a user attr


@pytest.mark.parametrize("pruner", ["median", "hyperband", "sha", "wilcoxon"])
def test_multi_objective_pruning_decides_as_optuna_does_for_accuracy_alone(pruner: str) -> None:
    curves = torch.rand(12, 5, generator=torch.Generator().manual_seed(3)).cumsum(1).div(5).tolist()
    single = optuna.create_study(study_name="s", direction="maximize", pruner=create_pruner(pruner, max_epochs=5))
    multi = optuna.create_study(
        study_name="s", directions=["maximize", "minimize"], pruner=create_pruner(pruner, max_epochs=5)
    )
    epochs = EpochReports(multi)

    def run(study: optuna.Study, report: Callable[[optuna.Trial, int, float], bool]) -> list[int]:
        stopped = []
        for curve in curves:
            trial = study.ask()
            steps = next((i for i, v in enumerate(curve) if report(trial, i, v)), None)
            stopped.append(len(curve) if steps is None else steps + 1)
            if steps is None:
                study.tell(trial, max(curve) if len(study.directions) == 1 else [max(curve), 1.0])
            else:
                study.tell(trial, state=TrialState.PRUNED)
        return stopped

    def optuna_report(trial: optuna.Trial, epoch: int, value: float) -> bool:
        trial.report(value, epoch)
        return trial.should_prune()

    expected = run(single, optuna_report)
    assert expected != [5] * len(curves), "the curves must make the pruner stop some trials"
    assert run(multi, epochs.report) == expected


def test_continuing_a_study_with_other_objectives_is_one_clear_error(tmp_path: Path) -> None:
    cfg = SearchConfig(model="test_resnet", data=tmp_path, run_dir=tmp_path, objectives=ACC_PARAMS).resolved()
    assert open_study(cfg).user_attrs["objectives"] == list(ACC_PARAMS)
    with pytest.raises(AutoftError, match="was run with --objective accuracy,params, not accuracy;"):
        open_study(SearchConfig(model="test_resnet", data=tmp_path, run_dir=tmp_path).resolved())


@pytest.mark.ray
@pytest.mark.slow
def test_two_objective_search_on_ray(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), noise=90)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = autoft.search(
            "test_resnet", data, trials=3, run_dir=tmp_path / "run", backend="ray", max_concurrent=1,
            pretrained=False, image_size=16, max_epochs=2, objectives="accuracy,params",
        )  # fmt: skip
    finally:
        ray.shutdown()
    complete = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert complete and all(t.values[1] == t.user_attrs["params"] for t in complete)
    assert [p.trial for p in result.pareto] == [p.trial for p in pareto_front(
        [ParetoPoint(t.number, tuple(t.values)) for t in complete], ACC_PARAMS)]  # fmt: skip
    kept = sorted(p.name for p in (tmp_path / "run" / "pareto").iterdir())
    assert kept == sorted(f"trial-{p.trial:04d}" for p in result.pareto)
    assert json.loads((result.model_dir / "config.json").read_text())["trial"] == result.best_trial
