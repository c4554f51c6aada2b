"""``--warm-start RUN_DIR``: a new study seeded with an earlier run's COMPLETE trials that fit its space."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

import autoft
from autoft import results
from autoft.errors import AutoftError
from autoft.objectives import directions
from autoft.space import Param, SearchSpace
from autoft.warmstart import seed_study
from conftest import make_image_folder

SPACE = SearchSpace(
    (
        Param("lr", "float", low=1e-4, high=1e-2, log=True),
        Param("optimizer", "categorical", choices=("adamw", "sgd")),
        Param("epochs", "fixed", value=3),
    )
)
WIDE = {"lr": FloatDistribution(1e-5, 1.0, log=True), "optimizer": CategoricalDistribution(("adamw", "sgd", "adam"))}


def _earlier(lr: float, optimizer: str, score: float, *, epochs: int = 3, state: TrialState = TrialState.COMPLETE):
    params = {"lr": lr, "optimizer": optimizer}
    return create_trial(
        state=state,
        value=score if state == TrialState.COMPLETE else None,
        params=params,
        distributions=WIDE,
        intermediate_values={0: score / 2, 1: score},
        user_attrs={"knobs": params | {"epochs": epochs}, "best_score": score},
    )


def earlier_run(root: Path, trials: list[FrozenTrial], objectives: tuple[str, ...] = ("accuracy",)) -> Path:
    """A run folder as autoft search leaves it: config.yaml naming a SQLite study that holds ``trials``."""
    root.mkdir(parents=True)
    storage = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="earlier", directions=directions(objectives))
    study.set_user_attr("objectives", list(objectives))
    study.add_trials(trials)
    (root / "config.yaml").write_text(yaml.safe_dump({"storage": storage, "study_name": "earlier"}))
    return root


def new_study(tmp_path: Path, objectives: tuple[str, ...] = ("accuracy",)) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'new.db'}", directions=directions(objectives))
    study.set_user_attr("objectives", list(objectives))
    return study


def test_fitting_trials_are_seeded_and_the_rest_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = earlier_run(
        tmp_path / "earlier",
        [
            _earlier(1e-3, "adamw", 0.8),
            _earlier(0.5, "adamw", 0.9),  # lr outside the current range
            _earlier(1e-3, "adam", 0.7),  # optimizer no longer a choice
            _earlier(2e-3, "sgd", 0.6, epochs=5),  # the space now fixes epochs=3
            _earlier(5e-3, "sgd", 0.6),
            _earlier(1e-3, "sgd", 0.3, state=TrialState.PRUNED),  # only COMPLETE trials are seeded
        ],
    )
    study = new_study(tmp_path)
    with caplog.at_level(logging.INFO, logger="autoft.warmstart"):
        assert seed_study(study, SPACE, run) == 2
    assert "3 earlier trial(s) do not fit" in caplog.text and "lr=0.5" in caplog.text and "epochs=3" in caplog.text
    seeded = study.get_trials()
    assert [(t.params["lr"], t.value) for t in seeded] == [(1e-3, 0.8), (5e-3, 0.6)]
    assert seeded[0].intermediate_values == {0: 0.4, 1: 0.8} and seeded[0].distributions["lr"].high == 1e-2
    assert all(t.user_attrs["warm_start_from"].startswith(str(run)) for t in seeded)
    assert results.finished_count(study) == 0 and results.trained_trials(study) == []  # the budget is untouched
    sampled = SPACE.sample(study.ask())  # the sampler goes on from the seeded trials
    assert 1e-4 <= sampled["lr"] <= 1e-2


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing", "does not exist"),
        ("no study", "holds no study"),
        ("no complete trial", "has no COMPLETE trial"),
        ("other objectives", "optimized accuracy,params but this search optimizes accuracy"),
    ],
)
def test_bad_warm_start_is_one_clear_error(tmp_path: Path, case: str, phrase: str) -> None:
    pruned = [_earlier(1e-3, "adamw", 0.5, state=TrialState.PRUNED)]
    runs = {
        "missing": lambda: tmp_path / "nope",
        "no study": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "no complete trial": lambda: earlier_run(tmp_path / "pruned", pruned),
        "other objectives": lambda: earlier_run(tmp_path / "mo", [], objectives=("accuracy", "params")),
    }
    with pytest.raises(AutoftError, match="--warm-start") as error:
        seed_study(new_study(tmp_path), SPACE, runs[case]())
    assert phrase in str(error.value)


@pytest.mark.slow
def test_warm_start_from_a_finished_run(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), noise=90)
    tiny = {"pretrained": False, "image_size": 16, "max_epochs": 2, "priors": False}  # the portfolio as written
    autoft.search("test_resnet", data, trials=3, run_dir=tmp_path / "a", **tiny)  # the portfolio's 3 recipes
    earlier = optuna.load_study(study_name="test_resnet-data", storage=f"sqlite:///{tmp_path / 'a' / 'study.db'}")
    fits = [t.number for t in earlier.trials if t.state == TrialState.COMPLETE and t.params["freeze"] == "partial"]
    assert 0 < len(fits) < 3  # the fixed freeze=partial below leaves the others out

    result = autoft.search(
        "test_resnet", data, trials=2, run_dir=tmp_path / "b", warm_start_from=tmp_path / "a",
        space_fixed=("freeze=partial",), **tiny,
    )  # fmt: skip
    trials = result.study.get_trials()
    seeded = [t for t in trials if "warm_start_from" in t.user_attrs]
    assert [t.user_attrs["warm_start_from"].rsplit("#trial-", 1)[1] for t in seeded] == [str(n) for n in fits]
    assert [t.state for t in trials[len(seeded) :]] == [TrialState.COMPLETE] * 2  # then it samples 2 more
    assert result.best_trial >= len(seeded)  # best/ is a model trained here, never a seeded score
    assert json.loads((result.model_dir / "config.json").read_text())["trial"] == result.best_trial
    assert "seeded by --warm-start" in (tmp_path / "b" / "trials.csv").read_text()
