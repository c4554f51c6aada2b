"""Tests for autoft.space: presets, conditional sampling with a real Optuna study, and YAML validation."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.space import Param, SearchSpace, _presets_dir, load_space, preset_names

optuna.logging.set_verbosity(optuna.logging.WARNING)

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def _asks(space: SearchSpace, n: int, *, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- presets --------------------------------------------------------------------------------------


def test_default_preset_loads_in_order() -> None:
    space = load_space("default")
    assert space.source.endswith("default.yaml")
    names = space.names()
    assert names[0] == "freeze"
    assert {"lr", "optimizer", "epochs", "train_blocks", "lp_epochs", "momentum"} <= set(names)
    assert names.index("freeze") < names.index("train_blocks")
    lr = space.params[names.index("lr")]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-2, True)


def test_preset_names_lists_the_bundled_folder() -> None:
    assert "default" in preset_names()
    assert preset_names() == PRESETS
    assert _presets_dir().is_dir()


def test_load_space_by_path_equals_by_name() -> None:
    by_name = load_space("default")
    by_path = load_space(_presets_dir() / "default.yaml")
    assert by_name.params == by_path.params


def test_unknown_preset_lists_presets_and_closest_match() -> None:
    with pytest.raises(AutoftError) as info:
        load_space("defualt")
    message = str(info.value)
    assert "'defualt'" in message
    assert "did you mean 'default'" in message
    assert f"Presets: {', '.join(preset_names())}" in message


def test_missing_space_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(AutoftError, match=r"does not exist") as info:
        load_space(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_samples_and_builds_a_recipe(preset: str) -> None:
    space = load_space(preset)
    for params in _asks(space, 20):
        assert set(params) <= set(space.names())
        Recipe.from_params(params)  # every preset knob is a recipe field with a valid value


# --- sampling -------------------------------------------------------------------------------------


def test_default_space_conditional_params_appear_only_when_their_condition_holds() -> None:
    samples = _asks(load_space("default"), 150, seed=1)
    seen_freeze = {s["freeze"] for s in samples}
    seen_opt = {s["optimizer"] for s in samples}
    assert seen_freeze == {"linear_probe", "partial", "full", "lp_ft"}
    assert seen_opt == {"adamw", "adam", "sgd"}
    for s in samples:
        assert ("train_blocks" in s) == (s["freeze"] == "partial")
        assert ("lp_epochs" in s) == (s["freeze"] == "lp_ft")
        assert ("momentum" in s) == (s["optimizer"] == "sgd")
        assert ("head_lr_ratio" in s) == (s["freeze"] != "linear_probe")
        assert ("layer_decay" in s) == (s["freeze"] != "linear_probe")
        assert 1e-5 <= s["lr"] <= 3e-2
        assert 2 <= s["epochs"] <= 12
        assert isinstance(s["epochs"], int)
        assert s["batch_size"] in (16, 32, 64, 128)
        if "train_blocks" in s:
            assert 1 <= s["train_blocks"] <= 4


def test_sampled_params_are_recorded_on_the_optuna_trial() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    chosen = load_space("default").sample(trial)
    assert trial.params == chosen


def test_same_seed_same_samples() -> None:
    space = load_space("default")
    assert _asks(space, 5, seed=7) == _asks(space, 5, seed=7)
    assert _asks(space, 5, seed=7) != _asks(space, 5, seed=8)


def test_fixed_params_are_returned_without_asking_the_trial() -> None:
    space = SearchSpace((Param("optimizer", "fixed", value="sgd"), Param("lr", "float", low=0.1, high=0.2)))
    study = optuna.create_study()
    trial = study.ask()
    chosen = space.sample(trial)
    assert chosen["optimizer"] == "sgd"
    assert set(trial.params) == {"lr"}


def test_plain_yaml_values_are_fixed_params(tmp_path: Path) -> None:
    path = _write(tmp_path, "params:\n  optimizer: sgd\n  epochs: 3\n  lr: {type: fixed, value: 0.01}\n")
    space = load_space(path)
    assert [(p.kind, p.value) for p in space.params] == [("fixed", "sgd"), ("fixed", 3), ("fixed", 0.01)]
    assert _asks(space, 1) == [{"optimizer": "sgd", "epochs": 3, "lr": 0.01}]


def test_when_accepts_a_single_value_or_a_list(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "params:\n"
        "  freeze: {type: categorical, choices: [partial, lp_ft, full]}\n"
        "  train_blocks: {type: int, low: 1, high: 2, when: {freeze: partial}}\n"
        "  lp_epochs: {type: int, low: 1, high: 2, when: {freeze: [lp_ft, full]}}\n",
    )
    space = load_space(path)
    assert space.params[1].when == {"freeze": ("partial",)}
    assert space.params[2].when == {"freeze": ("lp_ft", "full")}
    for s in _asks(space, 30):
        assert ("train_blocks" in s) == (s["freeze"] == "partial")
        assert ("lp_epochs" in s) == (s["freeze"] != "partial")


def test_int_step_and_float_step_are_respected(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "params:\n  batch_size: {type: int, low: 8, high: 64, step: 8}\n"
        "  label_smoothing: {type: float, low: 0.0, high: 0.2, step: 0.05}\n",
    )
    for s in _asks(load_space(path), 30):
        assert s["batch_size"] % 8 == 0
        assert round(s["label_smoothing"] / 0.05, 6) == round(s["label_smoothing"] / 0.05)


def test_with_max_epochs_caps_the_range() -> None:
    space = load_space("default")
    capped = space.with_max_epochs(5)
    epochs = capped.params[capped.names().index("epochs")]
    assert (epochs.low, epochs.high) == (2, 5)
    assert max(s["epochs"] for s in _asks(capped, 40)) <= 5
    tight = space.with_max_epochs(1).params[space.names().index("epochs")]
    assert (tight.low, tight.high) == (1, 1)
    roomy = space.with_max_epochs(50).params[space.names().index("epochs")]
    assert (roomy.low, roomy.high) == (2, 12)
    assert space.params[space.names().index("epochs")].high == 12  # the original is unchanged


def test_with_max_epochs_caps_a_fixed_epochs_value() -> None:
    space = SearchSpace((Param("epochs", "fixed", value=8), Param("lr", "float", low=0.1, high=0.2)))
    assert space.with_max_epochs(3).params[0].value == 3
    assert space.with_max_epochs(20).params[0].value == 8


# --- bad YAML -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "pattern"),
    [
        ("  lr: {type: number, low: 0.1, high: 1}\n", "lr", r"unknown type 'number'.*use one of: float, int"),
        ("  lr: {low: 0.1, high: 1}\n", "lr", r"unknown type None"),
        ("  lr: {type: float, low: 1.0, high: 0.1}\n", "lr", r"`low <= high` must hold, but got low=1.0, high=0.1"),
        (
            "  lr: {type: float, low: 0, high: 0.1, log: true}\n",
            "lr",
            r"log range cannot include 0 or negative values, but got low=0",
        ),
        ("  lr: {type: float, low: -1, high: 0.1, log: true}\n", "lr", r"log range cannot include 0"),
        ("  lr: {type: float, low: a, high: 0.1}\n", "lr", r"needs finite numeric 'low' and 'high', but got low='a'"),
        ("  lr: {type: float, high: 0.1}\n", "lr", r"needs finite numeric 'low' and 'high', but got low=None"),
        ("  optimizer: {type: categorical, choices: []}\n", "optimizer", r"non-empty list 'choices'"),
        ("  optimizer: {type: categorical, choices: sgd}\n", "optimizer", r"non-empty list 'choices'"),
        (
            "  momentum: {type: float, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n"
            "  optimizer: {type: categorical, choices: [sgd, adam]}\n",
            "momentum",
            r"'when' names 'optimizer', which is listed after it",
        ),
        (
            "  lr: {type: float, low: 0.1, high: 1, when: {ghost: 1}}\n",
            "lr",
            r"'when' names 'ghost'",
        ),
        ("  lr: {type: float, low: 0.1, high: 1, when: {lr: 0.5}}\n", "lr", r"'when' names 'lr'"),
        # Found by these tests: each used to load and then crash or misbehave only when sampled.
        (
            "  freeze: {type: categorical, choices: [partial]}\n"
            "  train_blocks: {type: int, low: 1, high: 2, when: freeze}\n",
            "train_blocks",
            r"'when' must map earlier parameters to values, but got 'freeze'",
        ),
        ("  lr: {type: float, low: 0.1, high: 1, log: true, step: 0.1}\n", "lr", r"cannot be combined with 'log"),
        (
            "  train_blocks: {type: int, low: 1.5, high: 2.5}\n",
            "train_blocks",
            r"whole-number bounds, but got low=1.5, high=2.5",
        ),
        (
            "  train_blocks: {type: int, low: 1, high: 8, step: 0}\n",
            "train_blocks",
            r"'step' must be a positive int.* step=0",
        ),
        (
            "  train_blocks: {type: int, low: 1, high: 8, step: 2.5}\n",
            "train_blocks",
            r"'step' must be a positive int.* step=2.5",
        ),
        (
            "  label_smoothing: {type: float, low: 0, high: 1, step: -0.1}\n",
            "label_smoothing",
            r"'step' must be a positive float",
        ),
    ],
    ids=[
        "unknown-type",
        "missing-type",
        "low-above-high",
        "log-with-zero",
        "log-with-negative",
        "non-numeric-low",
        "missing-low",
        "empty-choices",
        "choices-not-a-list",
        "when-names-later-param",
        "when-names-unknown-param",
        "when-names-itself",
        "when-not-a-mapping",
        "log-with-step",
        "int-with-fractional-bounds",
        "int-step-zero",
        "int-step-fractional",
        "float-step-negative",
    ],
)
def test_bad_parameter_names_file_and_parameter(tmp_path: Path, body: str, param: str, pattern: str) -> None:
    path = _write(tmp_path, "params:\n" + body)
    with pytest.raises(AutoftError, match=pattern) as info:
        load_space(path)
    assert f"{path}: parameter {param!r}" in str(info.value)


@pytest.mark.parametrize("text", ["", "params:\n", "params: {}\n", "params: [lr, wd]\n", "lr: 0.1\n", "- 1\n"])
def test_missing_or_empty_params_names_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(AutoftError, match=r"needs a non-empty mapping 'params:'") as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "params:\n  lr: {type: float, low: 0.1\n")
    with pytest.raises(AutoftError, match=r"YAML syntax error") as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_portfolio_entries_must_name_parameters_of_the_space(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2}\nportfolio:\n  - {lr: 1.0e-3, lrr: 2}\n")
    with pytest.raises(AutoftError, match=r"portfolio entry 1 sets lrr"):
        load_space(path)
    path.write_text("params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2}\nportfolio: {lr: 1.0e-3}\n")
    with pytest.raises(AutoftError, match="list of mappings"):
        load_space(path)


def test_portfolio_epochs_are_capped_with_the_space() -> None:
    portfolio = load_space("default").with_max_epochs(3).portfolio
    assert portfolio and all(entry["epochs"] <= 3 for entry in portfolio)
