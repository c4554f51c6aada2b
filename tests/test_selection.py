"""Model selection as numbers in, decisions out; the record in a real SQLite study; the model knob; --model a,b."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from autoft import selection
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.recipe import Recipe, describe_knobs
from autoft.selection import Rung, Stage, run_rungs, survivors
from autoft.space import load_space


def test_survivors_keep_the_best_half_rounded_up() -> None:
    scores = {"a": 0.50, "b": 0.90, "c": 0.60, "d": 0.70, "e": 0.95}
    assert survivors(scores, margin=0.0) == ("b", "d", "e")  # ceil(5 / 2) = 3, in the order given


def test_survivors_keep_every_model_within_the_margin_of_the_best() -> None:
    scores = {"a": 0.80, "b": 0.79, "c": 0.785, "d": 0.70}
    assert survivors(scores, margin=0.02) == ("a", "b", "c")
    assert survivors(scores, margin=0.0) == ("a", "b")


def test_survivors_keep_at_least_one_and_rank_non_finite_scores_last() -> None:
    assert survivors({"only": 0.1}) == ("only",)
    assert survivors({"a": math.nan, "b": 0.2, "c": -math.inf}, margin=0.0) == ("a", "b")  # ceil(3/2) = 2: b, a


def test_survivors_keep_ties_for_the_best_and_break_other_ties_by_the_order_given() -> None:
    assert survivors({"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}, margin=0.0) == ("a", "b", "c", "d")
    assert survivors({"a": 0.9, "b": 0.5, "c": 0.5, "d": 0.5}, margin=0.0) == ("a", "b")


def test_survivors_reject_a_bad_margin_and_no_candidates() -> None:
    with pytest.raises(AutoftError, match=r"margin=1\.5"):
        survivors({"a": 1.0}, margin=1.5)
    with pytest.raises(AutoftError, match="at least one candidate"):
        survivors({})


def test_rungs_halve_then_a_short_fine_tune_decides_among_more_than_two() -> None:
    probe = {"a": 0.9, "b": 0.2, "c": 0.85, "d": 0.8, "e": 0.3}
    tune = {"a": 0.70, "c": 0.95, "d": 0.80}
    measured: list[str] = []

    def measure_tune(model: str) -> float:
        measured.append(model)
        return tune[model]

    rungs = run_rungs("abcde", [Stage("probe", probe.get), Stage("tune", measure_tune, runs_above=2)], margin=0.0)
    assert [r.kept for r in rungs] == [("a", "c", "d"), ("c", "d")]
    assert rungs[0].dropped == ("b", "e") and rungs[1].dropped == ("a",)
    assert measured == ["a", "c", "d"]  # the dropped models are never fine-tuned
    assert selection.final("abcde", rungs) == ("c", "d")


def test_rung_two_is_skipped_when_two_or_fewer_models_are_left() -> None:
    never = Stage("tune", lambda model: pytest.fail("rung 2 must not run"), runs_above=2)
    rungs = run_rungs(["a", "b", "c", "d"], [Stage("probe", {"a": 0.9, "b": 0.5, "c": 0.4, "d": 0.8}.get), never])
    assert [r.kept for r in rungs] == [("a", "d")]


def test_an_interrupted_measurement_decides_nothing() -> None:
    assert run_rungs(["a", "b"], [Stage("probe", {"a": 0.9, "b": None}.get)]) is None


def test_the_decision_line_names_dropped_models_with_their_numbers() -> None:
    rungs = [
        Rung("linear probe", {"a": 0.9, "b": 0.3, "c": 0.88, "d": math.nan}, ("a", "c")),
        Rung("short fine-tune", {"a": 0.7, "c": 0.9}, ("c",)),
    ]
    assert selection.describe(rungs) == (
        "model selection: linear probe dropped b (val acc 0.3000), d (failed) vs val acc 0.9000 for a; "
        "short fine-tune dropped a (val acc 0.7000) vs val acc 0.9000 for c; kept c"
    )
    tie = [Rung("linear probe", {"a": 0.5, "b": 0.5}, ("a", "b"))]
    assert selection.describe(tie) == (
        "model selection: linear probe dropped none (a val acc 0.5000, b val acc 0.5000); kept a, b"
    )


def test_the_record_survives_in_the_study_and_guards_against_other_candidates(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    assert selection.load_record(study, ["a", "b"]) is None and selection.summary_line(study) is None
    rungs = [Rung("linear probe", {"a": 0.9, "b": 0.3}, ("a",))]
    selection.save_record(study, ["a", "b"], rungs)
    reloaded = optuna.load_study(storage=storage, study_name="s")
    assert selection.load_record(reloaded, ["a", "b"]) == rungs
    assert selection.summary_line(reloaded) == selection.describe(rungs)
    with pytest.raises(AutoftError, match="selected among the models a,b, but --model now names a,c"):
        selection.load_record(reloaded, ["a", "c"])


def test_the_model_knob_leads_the_space_and_the_portfolio_runs_on_every_model() -> None:
    space = selection.with_models(load_space("default"), ["m1", "m2"])
    portfolio = space.portfolio
    assert [entry["model"] for entry in portfolio[:4]] == ["m1", "m2", "m1", "m2"]
    assert portfolio[0] | {"model": "m2"} == portfolio[1]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = {space.sample(study.ask())["model"] for _ in range(12)}
    assert sampled == {"m1", "m2"}
    other = optuna.create_study(direction="maximize")
    single = selection.with_models(load_space("quick"), ["m1"]).sample(other.ask())
    assert single["model"] == "m1" and "model" not in other.trials[-1].params  # one left: recorded, not searched


def test_a_space_that_sets_the_model_itself_is_refused() -> None:
    with pytest.raises(AutoftError, match="'model' is chosen by the controller"):
        selection.with_models(load_space("quick", fixed=["model=x"]), ["a", "b"])


def test_the_short_fine_tune_is_the_first_portfolio_recipe_that_tunes_more_than_the_head() -> None:
    space = load_space("default").with_max_epochs(10)
    recipe = selection.short_finetune_recipe(space, max_epochs=10)
    first = next(e for e in space.portfolio if e["freeze"] != "linear_probe")  # the learned table's order
    assert (recipe.freeze, recipe.lr, recipe.epochs) == (first["freeze"], first["lr"], selection.SHORT_EPOCHS)
    assert selection.short_finetune_recipe(load_space("quick"), max_epochs=1) == Recipe.from_params({"epochs": 1})
    assert selection.probe_recipe(3).freeze == "linear_probe" and selection.probe_recipe(3).epochs == 3


def test_a_recipe_ignores_the_model_knob_and_descriptions_lead_with_it() -> None:
    assert Recipe.from_params({"model": "test_resnet", "lr": 0.01}) == Recipe(lr=0.01)
    assert describe_knobs({"model": "test_resnet", "freeze": "full"}).startswith("test_resnet: full fine-tune")


def test_config_keeps_several_models_and_checks_them() -> None:
    cfg = SearchConfig(model=" test_resnet , test_efficientnet", data=Path("data"))
    assert cfg.model == "test_resnet,test_efficientnet" and cfg.models == ("test_resnet", "test_efficientnet")
    assert SearchConfig(model=["a", "b"], data=Path("data")).resolved().study_name == "a-b-data"
    with pytest.raises(AutoftError, match="names a more than once"):
        SearchConfig(model="a,b,a", data=Path("data"))
    with pytest.raises(AutoftError, match="empty name"):
        SearchConfig(model="a,,b", data=Path("data"))
    with pytest.raises(AutoftError, match="--weights loads one file into one model, but --model names 2"):
        SearchConfig(model="a,b", data=Path("data"), weights=Path("w.pth"))
    with pytest.raises(AutoftError, match="--model must be a timm model name"):
        SearchConfig(model=[], data=Path("data"))
