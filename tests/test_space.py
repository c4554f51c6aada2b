"""Search spaces: every bundled preset, the YAML format's validation, --set / --fix, the Python API, the CLI."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import autoft
from autoft.cli import main
from autoft.recipe import Recipe
from autoft.space import Param, SearchSpace, load_space, preset_description, preset_names, preset_path

PRESETS = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_the_issue_presets_are_bundled() -> None:
    assert {"default", "quick", "full", "lp-ft"} <= {p.stem for p in PRESETS} == set(preset_names())


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_validates_and_samples_recipes(path: Path) -> None:
    assert path.read_text().startswith(f"# {path.stem} — "), "each preset starts by saying when to use it"
    assert len(preset_description(path)) > 40
    space = load_space(path.stem).with_max_epochs(3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(40):  # 8 freeze modes in full: 20 random draws could miss one
        trial = study.ask()
        recipe = Recipe.from_params(space.sample(trial))  # every sample is a recipe that can train
        assert 1 <= recipe.epochs <= 3
        seen.add(recipe.freeze)
        study.tell(trial, 0.5)
    freeze = next(p for p in space.params if p.name == "freeze")
    assert seen == set(freeze.choices or (freeze.value,))  # conditional knobs never block a branch


def test_full_preset_searches_everything_the_issue_lists() -> None:
    names = set(load_space("full").names())
    assert {"lp_epochs", "layer_decay", "mixup", "cutmix", "label_smoothing", "augment", "warmup_epochs"} <= names


def test_quick_preset_stays_cheap() -> None:
    space = load_space("quick")
    freeze = next(p for p in space.params if p.name == "freeze")
    epochs = next(p for p in space.params if p.name == "epochs")
    assert set(freeze.choices) == {"linear_probe", "partial"} and epochs.high <= 4


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


BAD_FILES = {
    "low_above_high": ("params:\n  lr: {type: float, low: 0.1, high: 0.01}\n", r"parameter 'lr'.*low <= high.*low=0.1"),
    "unknown_type": (
        "params:\n  lr: {type: floot, low: 0.1, high: 1}\n",
        r"parameter 'lr' has unknown type 'floot'.*'float'",
    ),
    "unknown_knob": (
        "params:\n  learning_rate: {type: float, low: 0.1, high: 1}\n",
        r"parameter 'learning_rate' is not a strategy knob",
    ),
    "when_names_nothing": (
        "params:\n  train_blocks: {type: int, low: 1, high: 3, when: {frozen: partial}}\n",
        r"parameter 'train_blocks': 'when' names 'frozen', which is no parameter of this space",
    ),
    "when_names_later": (
        "params:\n  momentum: {type: float, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n"
        "  optimizer: {type: categorical, choices: [sgd, adamw]}\n",
        r"parameter 'momentum': 'when' names 'optimizer', which is listed after it",
    ),
    "log_range_includes_zero": (
        "params:\n  weight_decay: {type: float, low: 0.0, high: 0.1, log: true}\n",
        r"parameter 'weight_decay': a log range cannot include 0.*low=0.0",
    ),
    "yaml_syntax_error": ("params:\n  lr: {type: float, low: 0.1\n  epochs: 3\n", r"YAML syntax error at line 3"),
    "unknown_choice": (
        "params:\n  optimizer: {type: categorical, choices: [adamw, lamb]}\n",
        r"'lamb' is not a known optimizer",
    ),
    "misspelt_key": ("params:\n  lr: {type: float, low: 0.1, hihg: 1}\n", r"unknown key 'hihg'.*did you mean 'high'"),
    "no_params": ("parameters:\n  lr: 0.1\n", r"non-empty mapping 'params:'"),
    "int_with_float_bounds": ("params:\n  epochs: {type: int, low: 1.5, high: 4}\n", r"whole-number bounds"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_file_is_rejected_naming_file_parameter_and_problem(tmp_path: Path, case: str) -> None:
    text, message = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(autoft.AutoftError, match=message) as caught:
        load_space(path)
    assert str(path) in str(caught.value)


def test_yaml_1_1_exponent_without_dot_is_read_as_a_number(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "params:\n  lr: {type: float, low: 1e-5, high: 1e-2, log: true}\n"))
    assert space.params[0].low == pytest.approx(1e-5)


def test_set_and_fix_tweak_a_preset_without_copying_it() -> None:
    space = load_space("default", overrides=["lr.high=1e-2", "epochs.low=3"], fixed=["optimizer=adamw"])
    params = {p.name: p for p in space.params}
    assert params["lr"].high == pytest.approx(1e-2) and params["epochs"].low == 3
    assert params["optimizer"].kind == "fixed" and params["optimizer"].value == "adamw"
    assert "--set lr.high=1e-2" in space.source


@pytest.mark.parametrize(
    ("overrides", "fixed", "message"),
    [
        (["lr.high"], [], r"--set expects PARAM.FIELD=VALUE"),
        (["lrr.high=1"], [], r"has no parameter 'lrr' \(did you mean 'lr'\?\)"),
        (["lr.high=1e-9"], [], r"parameter 'lr'.*low <= high"),
        ([], ["optimizer=lamb"], r"'lamb' is not a known optimizer"),
        ([], ["optimizer"], r"--fix expects PARAM=VALUE"),
    ],
)
def test_bad_set_or_fix_says_what_is_wrong(overrides: list[str], fixed: list[str], message: str) -> None:
    with pytest.raises(autoft.AutoftError, match=message):
        load_space("default", overrides=overrides, fixed=fixed)


def test_space_built_in_code_round_trips_through_yaml(tmp_path: Path) -> None:
    space = autoft.SearchSpace(
        [
            Param("freeze", "categorical", choices=["linear_probe", "partial"]),
            Param("train_blocks", "int", low=1, high=3, when={"freeze": "partial"}),
            Param("lr", "float", low=1e-4, high=1e-1, log=True),
            Param("epochs", "fixed", value=2),
        ]
    )
    path = tmp_path / "mine.yaml"
    space.to_yaml(path)
    again = SearchSpace.from_yaml(path)
    assert again.params == space.params and again.to_yaml() == space.to_yaml()


def test_space_built_in_code_is_validated_like_a_file() -> None:
    with pytest.raises(autoft.AutoftError, match=r"search space <code>: parameter 'lr': .*low <= high"):
        SearchSpace([Param("lr", "float", low=1.0, high=0.1)])
    with pytest.raises(autoft.AutoftError, match=r"parameter 'lr' is listed twice"):
        SearchSpace([Param("lr", "fixed", value=0.1), Param("lr", "fixed", value=0.2)])


def test_cli_spaces_list_and_show(capsys: pytest.CaptureFixture) -> None:
    assert main(["spaces", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("default", "quick", "full", "lp-ft"):
        assert name in listed
    assert "small budgets" in listed
    assert main(["spaces", "show", "lp-ft"]) == 0
    assert capsys.readouterr().out.endswith(preset_path("lp-ft").read_text())
    assert main(["spaces", "show", "quick", "--fix", "optimizer=sgd"]) == 0
    assert "optimizer: sgd" in capsys.readouterr().out


def test_cli_rejects_a_bad_space_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write(tmp_path, "params:\n  lr: {type: float, low: 0, high: 1, log: true}\n")
    args = ["search", "--model", "test_resnet", "--no-pretrained", "--data", str(tmp_path / "nodata")]
    code = main([*args, "--space", str(bad), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "log range cannot include 0" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "study.db").exists()
    assert main([*args, "--space", "default", "--set", "lr.low=-1", "--run-dir", str(tmp_path / "run")]) == 2


def test_max_epochs_caps_spaces_that_do_not_search_epochs() -> None:
    space = SearchSpace([Param("lr", "fixed", value=0.1)]).with_max_epochs(3)
    assert space.sample(None) == {"lr": 0.1, "epochs": 3}
    assert load_space(lambda trial: {"lr": 0.1}).with_max_epochs(2).sample(None)["epochs"] == 2


def test_rounds_set_every_trials_epoch_examples_but_the_whole_pass_modes() -> None:
    space = SearchSpace([Param("freeze", "fixed", value="full")]).with_max_epochs(3, epoch_examples=40)
    assert space.sample(None) == {"freeze": "full", "epoch_examples": 40, "epochs": 3}
    probe = SearchSpace([Param("freeze", "fixed", value="linear_probe")])
    assert "epoch_examples" not in probe.with_max_epochs(3, epoch_examples=40, whole_passes=("linear_probe",)).sample(
        None
    )
    function = load_space(lambda trial: {"freeze": "linear_probe"})
    assert function.with_max_epochs(2, epoch_examples=40).sample(None)["epoch_examples"] == 40
    whole = function.with_max_epochs(2, epoch_examples=40, whole_passes=("linear_probe",))
    assert "epoch_examples" not in whole.sample(None)
    assert load_space(lambda trial: {}).with_max_epochs(2, epoch_examples=40).sample(None)["epoch_examples"] == 40
