"""The search end to end through the Python API: real Optuna study in SQLite, real tiny timm model."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autoft
from autoft import results
from autoft.config import SearchConfig
from autoft.controller import run_search
from autoft.study import open_study, portfolio_left, systematic_error
from conftest import make_image_folder

pytestmark = pytest.mark.slow

# warm_start=False: these tests pin what the seeded sampler does; the portfolio has a test of its own.
TINY = {"pretrained": False, "image_size": 16, "max_epochs": 3, "warm_start": False, "priors": False}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True, noise=90)


def test_search_exports_best_model_that_reproduces_its_scores(data: Path, tmp_path: Path) -> None:
    result = autoft.search("test_resnet", data, trials=6, run_dir=tmp_path / "run", seed=1, **TINY)
    run = tmp_path / "run"
    assert {"study.db", "trials.csv", "config.yaml", "best"} <= {p.name for p in run.iterdir()}
    meta = json.loads((run / "best" / "config.json").read_text())
    assert meta["trial"] == result.best_trial and meta["val_accuracy"] == pytest.approx(result.best_score)
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["image_size"] == 16
    assert result.study.best_trial.number == result.best_trial
    assert len(result.study.trials) == 6

    tuned = autoft.load_model(result.model_dir)
    test_files = sorted((data / "test").glob("*/*.png"))
    predicted = tuned.predict(test_files)
    accuracy = sum(p == f.parent.name for p, f in zip(predicted, test_files, strict=True)) / len(test_files)
    assert accuracy == pytest.approx(result.test_score) == pytest.approx(meta["test_accuracy"])


def test_pruned_trials_are_recorded_pruned_with_their_curves(data: Path, tmp_path: Path) -> None:
    # Seed 2 is one whose (deterministic) search has the median pruner stop 3 of 10 trials.
    options = TINY | {"max_epochs": 4}
    result = autoft.search("test_resnet", data, trials=10, run_dir=tmp_path / "run", seed=2, **options)
    pruned = result.study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) >= 2
    for trial in pruned:
        stopped_at = len(trial.intermediate_values)
        assert stopped_at < trial.params["epochs"], "a PRUNED trial must have been stopped before its last epoch"
        assert trial.value is None or trial.value in trial.intermediate_values.values()
    exported = json.loads((result.model_dir / "config.json").read_text())["trial"]
    assert result.study.trials[exported].state == TrialState.COMPLETE


def test_running_again_continues_the_same_study(data: Path, tmp_path: Path) -> None:
    first = autoft.search("test_resnet", data, trials=3, run_dir=tmp_path / "run", **TINY)
    numbers = [t.number for t in first.study.trials]
    second = autoft.search("test_resnet", data, trials=5, run_dir=tmp_path / "run", **TINY)
    assert [t.number for t in second.study.trials] == [*numbers, 3, 4]
    assert second.study.trials[0].params == first.study.trials[0].params  # kept, not re-run
    third = autoft.search("test_resnet", data, trials=5, run_dir=tmp_path / "run", **TINY)
    assert len(third.study.trials) == 5  # budget reached: nothing more runs


def test_interrupted_trial_is_failed_and_retried(data: Path, tmp_path: Path) -> None:
    config = SearchConfig(model="test_resnet", data=data, trials=2, run_dir=tmp_path / "run", **TINY).resolved()
    config.run_dir.mkdir(parents=True)
    study = open_study(config)
    crashed = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 3e-2, log=True)})
    crashed.set_user_attr("knobs", {"lr": crashed.params["lr"]})  # all its parameters drawn: it was training
    assert crashed.params["lr"] > 0  # left RUNNING, as a killed driver leaves it
    result = run_search(config)
    states = [t.state for t in result.study.trials]
    assert states[0] == TrialState.FAIL and result.study.trials[0].user_attrs["interrupted"] is True
    assert result.study.trials[1].params["lr"] == pytest.approx(crashed.params["lr"])  # its parameters retried
    assert results.finished_count(result.study) == 2 and len(result.study.trials) == 3


def test_a_trial_killed_while_its_parameters_were_drawn_is_not_retried(data: Path, tmp_path: Path) -> None:
    config = SearchConfig(model="test_resnet", data=data, trials=1, run_dir=tmp_path / "run", **TINY).resolved()
    config.run_dir.mkdir(parents=True)
    study = open_study(config)
    # Optuna writes a trial's parameters one by one: a kill between two leaves some, and no knobs.
    half_drawn = study.ask({"lr": optuna.distributions.FloatDistribution(0.5, 0.6, log=True)})
    result = run_search(config)
    first, second = result.study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["unstarted"] and first.number == half_drawn.number
    assert "retry_of" not in second.user_attrs and not 0.5 <= second.params["lr"] <= 0.6  # drawn anew, whole
    assert "nothing ran; not retried" in results.trial_row(first)["note"]


def test_same_error_in_first_trials_stops_the_search_with_that_error(data: Path, tmp_path: Path) -> None:
    bad_space = tmp_path / "bad.yaml"
    # A space that validates but whose recipes cannot train: label smoothing must be below 1.
    bad_space.write_text("params:\n  lr: {type: float, low: 0.1, high: 0.2}\n  label_smoothing: 1.5\n")
    with pytest.raises(autoft.AutoftError, match="label_smoothing"):
        autoft.search("test_resnet", data, trials=10, space=str(bad_space), run_dir=tmp_path / "run", **TINY)
    study = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert len(study.trials) == 3 and all(t.state == TrialState.FAIL for t in study.trials)
    assert systematic_error(study) is not None
    assert "label_smoothing" in study.trials[0].user_attrs["error"]


def test_same_seed_same_search(data: Path, tmp_path: Path) -> None:
    a = autoft.search("test_resnet", data, trials=3, run_dir=tmp_path / "a", seed=3, **TINY)
    b = autoft.search("test_resnet", data, trials=3, run_dir=tmp_path / "b", seed=3, **TINY)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
    assert [t.intermediate_values for t in a.study.trials] == [t.intermediate_values for t in b.study.trials]
    assert a.best_trial == b.best_trial  # and the same best model, bit for bit
    assert (a.model_dir / "model.safetensors").read_bytes() == (b.model_dir / "model.safetensors").read_bytes()


def test_a_new_study_tries_the_portfolio_first_then_samples(data: Path, tmp_path: Path) -> None:
    portfolio = autoft.load_space("default").with_max_epochs(2).portfolio
    options = TINY | {"warm_start": True, "max_epochs": 2}
    result = autoft.search("test_resnet", data, trials=len(portfolio) + 1, run_dir=tmp_path / "run", **options)
    trials = result.study.trials
    for trial, recipe in zip(trials, portfolio, strict=False):
        assert {k: trial.params[k] for k in recipe} == dict(recipe)
    assert trials[-1].params != trials[0].params
    again = autoft.search("test_resnet", data, trials=len(trials) + 1, run_dir=tmp_path / "run", **options)
    assert len(again.study.trials) == len(trials) + 1  # resuming does not enqueue the portfolio again


def test_a_budget_smaller_than_the_portfolio_leaves_no_trial_waiting(data: Path, tmp_path: Path) -> None:
    portfolio = autoft.load_space("default").portfolio
    assert len(portfolio) > 2
    options = TINY | {"warm_start": True, "max_epochs": 1}
    result = autoft.search("test_resnet", data, trials=2, run_dir=tmp_path / "run", **options)
    assert [t.state for t in result.study.trials] == [TrialState.COMPLETE] * 2
    assert "WAITING" not in (tmp_path / "run" / "trials.csv").read_text()


def test_a_recipe_held_back_for_one_run_stays_in_the_studys_portfolio_and_a_resume_runs_it() -> None:
    """A one-trial budget holds the linear probe back (plan._one_fine_tune); the same study resumed with a larger
    budget (no recipe held back) still queues it, and the recipes already run are not queued again."""
    portfolio = autoft.load_space("text").portfolio
    study = optuna.create_study()
    first = portfolio_left(study, portfolio, held_back=("linear_probe",))
    assert [q.params for q in first] == [dict(r) for r in portfolio[1:]]
    ran = first[0].params  # the one fine-tune runs
    fixed = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in ran.items()}
    study.add_trial(optuna.trial.create_trial(params=ran, distributions=fixed, value=0.5))
    resumed = portfolio_left(study, portfolio)
    assert [q.params for q in resumed] == [dict(portfolio[0]), *map(dict, portfolio[2:])]


def test_keep_top_keeps_the_best_models_and_deletes_the_rest(data: Path, tmp_path: Path) -> None:
    result = autoft.search("test_resnet", data, trials=6, run_dir=tmp_path / "run", seed=1, keep_top=3, **TINY)
    complete = result.study.get_trials(states=(TrialState.COMPLETE,))
    ranked = [t.number for t in sorted(complete, key=lambda t: (-t.value, t.number))]
    assert json.loads((result.model_dir / "config.json").read_text())["trial"] == ranked[0]
    runners_up = sorted((tmp_path / "run" / "top").iterdir())
    assert [int(p.name.removeprefix("trial-")) for p in runners_up] == sorted(ranked[1:3])
    for folder in runners_up:  # each is a complete, loadable model of that trial
        tuned = autoft.load_model(folder)
        assert tuned.meta["val_accuracy"] == pytest.approx(result.study.trials[tuned.meta["trial"]].value)


def test_keep_top_must_be_at_least_one(data: Path, tmp_path: Path) -> None:
    with pytest.raises(autoft.AutoftError, match="--keep-top"):
        autoft.search("test_resnet", data, trials=1, run_dir=tmp_path / "run", keep_top=0, **TINY)


def test_a_search_stopped_mid_portfolio_leaves_nothing_waiting_and_finishes_the_portfolio_on_resume(
    data: Path, tmp_path: Path
) -> None:
    portfolio = autoft.load_space("default").with_max_epochs(1).portfolio
    options = TINY | {"warm_start": True, "max_epochs": 1}
    first = autoft.search("test_resnet", data, trials=1, run_dir=tmp_path / "run", **options)
    assert [t.state for t in first.study.trials] == [TrialState.COMPLETE]  # the rest of the portfolio not queued
    again = autoft.search("test_resnet", data, trials=len(portfolio), run_dir=tmp_path / "run", **options)
    ran = [{k: t.params[k] for k in recipe} for t, recipe in zip(again.study.trials, portfolio, strict=True)]
    assert ran == [dict(recipe) for recipe in portfolio]  # resumed where it stopped, each recipe once
