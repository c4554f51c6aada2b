"""Every --sampler and --pruner runs a tiny real search (real SQLite study, real tiny timm model)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autoft
from autoft.backends import local
from autoft.budget import CHEAP_FINISH, Budget, plan_budget
from autoft.config import PRUNERS, SAMPLERS
from autoft.objectives import EpochReports
from autoft.space import Param, SearchSpace
from autoft.study import _KeepsLpFt, _WithoutBudgetCuts, create_pruner, create_sampler, in_lp_ft_dip
from autoft.trial import EpochMetrics, TrialOutcome
from conftest import make_image_folder

# Two continuous knobs (so GP, CMA-ES and QMC model something after the 3 startup trials), cheap trials.
TINY_SPACE = SearchSpace(
    [
        Param("freeze", "fixed", value="partial"),
        Param("train_blocks", "fixed", value=1),
        Param("lr", "float", low=1e-4, high=1e-1, log=True),
        Param("weight_decay", "float", low=0.0, high=0.1),
        Param("epochs", "fixed", value=2),
        Param("batch_size", "fixed", value=32),
        Param("augment", "fixed", value="none"),
    ]
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "data", per_class=8, size=(16, 16), noise=90)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_an_optuna_sampler(name: str) -> None:
    assert isinstance(create_sampler(name, seed=0, trials=8), optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_is_an_optuna_pruner(name: str) -> None:
    assert isinstance(create_pruner(name, max_epochs=5), optuna.pruners.BasePruner)


def test_unknown_sampler_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(autoft.AutoftError, match=r"--sampler 'bo' is not known; choose one of: tpe, gp"):
        autoft.search("test_resnet", tmp_path, sampler="bo")


# Each sampler paired with one pruner, so five tiny searches run all five samplers and all five pruners.
@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "pruner"), list(zip(SAMPLERS, PRUNERS, strict=True)))
def test_tiny_search_with_each_sampler_and_pruner(data: Path, tmp_path: Path, sampler: str, pruner: str) -> None:
    result = autoft.search(
        "test_resnet",
        data,
        trials=4,
        space=TINY_SPACE,
        sampler=sampler,
        pruner=pruner,
        run_dir=tmp_path / "run",
        pretrained=False,
        image_size=16,
        max_epochs=2,
    )
    trials = result.study.trials
    assert len(trials) == 4 and not [t for t in trials if t.state == TrialState.FAIL]
    assert type(result.study.sampler) is type(create_sampler(sampler, seed=0, trials=4))
    assert type(result.study.pruner) is type(create_pruner(pruner, max_epochs=2))
    assert len({t.params["lr"] for t in trials}) == 4  # the sampler chose each trial's rate (3 startup + 1 own)
    assert 0.0 <= result.best_score <= 1.0 and result.model_dir.is_dir()
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # epoch-level reports reached the pruner


def _finished(freeze: str, values: list[float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=max(values), intermediate_values=dict(enumerate(values)), user_attrs={"knobs": {"freeze": freeze}}
    )


def _running(study: optuna.Study, freeze: str, values: list[float]) -> optuna.trial.FrozenTrial:
    """A trial in the study, still running, that reported ``values`` (as the backends report epochs)."""
    trial = study.ask()
    trial.set_user_attr("knobs", {"freeze": freeze, "lp_epochs": 1})
    for epoch, value in enumerate(values):
        trial.report(value, epoch)
    return study._storage.get_trial(trial._trial_id)


def test_the_pruner_does_not_stop_lp_ft_at_its_unfreezing_dip() -> None:
    study = optuna.create_study(direction="maximize", pruner=create_pruner("median", max_epochs=9))
    for _ in range(4):
        study.add_trial(_finished("full", [0.8, 0.85, 0.9, 0.92]))
    dip = [0.6, 0.2, 0.3]  # head-only epoch, the first joint epoch (the dip), the one after
    lp_ft, full = _running(study, "lp_ft", dip), _running(study, "full", dip)
    assert in_lp_ft_dip(lp_ft) and not in_lp_ft_dip(full)
    assert not study.pruner.prune(study, lp_ft)
    assert study.pruner.prune(study, full)  # the same curve without LP-FT's reason is cut
    assert study.pruner.prune(study, _running(study, "lp_ft", [*dip, 0.3]))  # still down one epoch later: cut


def _strong_study(directions: list[str]) -> optuna.Study:
    """A study whose three finished trials climbed to 0.9: a median pruner stops a trial at 0.2 after epoch 1."""
    study = optuna.create_study(directions=directions, pruner=create_pruner("median", max_epochs=9))
    for _ in range(3):
        curve = [0.8, 0.85, 0.9, 0.9]
        values = [0.9] + [10.0] * (len(directions) - 1)
        study.add_trial(optuna.trial.create_trial(values=values, intermediate_values=dict(enumerate(curve)),
                                                  user_attrs={"val_accuracy": curve}))  # fmt: skip
    return study


@pytest.mark.parametrize("directions", [["maximize"], ["maximize", "minimize"]])
def test_the_pruner_spares_a_trial_whose_rest_costs_less_than_the_finish_allowance(directions: list[str]) -> None:
    study = _strong_study(directions)
    epochs = EpochReports(study, finish_allowance=5.0)
    dear, cheap = study.ask(), study.ask()
    for trial in (dear, cheap):
        assert not epochs.report(trial, 0, 0.1, seconds_left=30.0)  # the warm-up epoch: never judged
    assert epochs.report(dear, 1, 0.2, seconds_left=5.5)  # stopping it frees 5.5 s: stopped
    assert not epochs.report(cheap, 1, 0.2, seconds_left=4.0)  # 4 s to its end: it runs on...
    assert not epochs.report(cheap, 2, 0.2, seconds_left=2.0)
    assert study.trials[cheap.number].user_attrs["pruning_waived"] == 1  # ...and the record says from when
    assert "pruning_waived" not in study.trials[dear.number].user_attrs
    assert not EpochReports(study).report(study.ask(), 1, 0.95, seconds_left=0.0)  # a good trial is never stopped


def test_a_budget_allows_a_share_of_its_search_time_to_finish_a_trial() -> None:
    from test_plan import PROBE, PROFILE  # the plan tests' measured probe and data

    planned = plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median")
    assert Budget.from_plan(planned, started=0.0).finish_allowance == pytest.approx(CHEAP_FINISH * planned.search)
    assert Budget(search_end=0.0, epoch_seconds=1.0).finish_allowance == 0.0  # a hand-made budget: the pruner decides


@pytest.mark.parametrize(("epoch_seconds", "state"), [(10.0, TrialState.PRUNED), (1.0, TrialState.COMPLETE)])
def test_the_local_backend_counts_a_trials_remaining_epochs_at_its_own_pace(epoch_seconds: float, state) -> None:
    # 4 epochs; judged after epoch 1 with 2 left: 20 s is more than the 5 s allowance, 2 s is not.
    study = _strong_study(["maximize"])
    space = SearchSpace([Param("lr", "float", low=1e-4, high=1e-1, log=True), Param("epochs", "fixed", value=4)])

    def execute(number: int, params: dict, report) -> TrialOutcome:
        history = []
        for epoch in range(params["epochs"]):
            history.append(EpochMetrics(epoch, train_loss=1.0, val_loss=1.0, val_accuracy=0.2, seconds=epoch_seconds))
            if report(epoch, history[-1]):
                return TrialOutcome(best_score=0.2, best_epoch=0, history=history, stopped_early=True)
        return TrialOutcome(best_score=0.2, best_epoch=0, history=history)

    local.optimize(study, space, execute, n_trials=1, timeout=None, on_trial_end=lambda t: None, should_stop=bool,
                   finish_allowance=5.0)  # fmt: skip
    assert study.trials[-1].state == state
    assert study.trials[-1].user_attrs.get("pruning_waived") == (1 if state == TrialState.COMPLETE else None)


@pytest.mark.parametrize("name", ["median", "hyperband", "sha", "wilcoxon"])
def test_every_pruner_asks_about_lp_ft_first_and_stays_what_optuna_expects(name: str) -> None:
    # SHA and Hyperband keep their rungs in attrs written while trials run, so the curve case above is the median's.
    pruner = create_pruner(name, max_epochs=9)
    assert isinstance(pruner, _KeepsLpFt)
    assert type(pruner).__mro__[2].__module__.startswith("optuna.pruners")  # Hyperband's isinstance checks hold


def test_the_model_based_samplers_learn_without_trials_the_deadline_cut() -> None:
    # A long recipe cut by --timeout scored low only because it ran short; the sampler must not learn "x near 9
    # is bad" from it. Seen through the view, the study has only the trials that ran as their knobs say.
    study = optuna.create_study(direction="maximize", sampler=create_sampler("tpe", seed=0, trials=20))
    x = optuna.distributions.FloatDistribution(0.0, 10.0)
    for value in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(params={"x": value}, distributions={"x": x}, value=value))
    cut = optuna.trial.create_trial(
        params={"x": 9.0}, distributions={"x": x}, value=0.1, user_attrs={"stopped_by_budget": "epoch 2 of 9"}
    )
    study.add_trial(cut)
    view = _WithoutBudgetCuts(study)
    assert [t.params["x"] for t in view.get_trials()] == [1.0, 2.0, 3.0] == [t.params["x"] for t in view.trials]
    assert len(study.trials) == 4 and view.directions == study.directions  # the study itself is untouched
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 10.0), n_trials=3)  # the sampler runs on the view
