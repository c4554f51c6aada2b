"""Tests for autoft.config: duration parsing, validation on construction, resolution and saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoft.config import SearchConfig, parse_duration
from autoft.errors import AutoftError

# --- parse_duration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        (" 1H 30M ", 5400.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (45, 45.0),
        (2.5, 2.5),
        (None, None),
    ],
)
def test_parse_duration_accepts_units_and_plain_seconds(text: str | float | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "10x", "-5", "1h30", "h", "", "5 minutes"])
def test_parse_duration_rejects_non_durations_naming_the_value(text: str) -> None:
    with pytest.raises(AutoftError, match="not a duration") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0", "0s", "0h0m", 0, -3, -0.5])
def test_parse_duration_rejects_zero_and_negative(text: str | int | float) -> None:
    with pytest.raises(AutoftError, match="must be a positive, finite duration") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


# --- SearchConfig validation ----------------------------------------------------------------------


def _config(**overrides: object) -> SearchConfig:
    return SearchConfig(**({"model": "test_resnet", "data": Path("data")} | overrides))


def test_config_defaults_are_valid_and_paths_are_coerced() -> None:
    cfg = _config(data="some/data", weights="w.pth", run_dir="runs/x")
    assert cfg.data == Path("some/data")
    assert cfg.weights == Path("w.pth")
    assert cfg.run_dir == Path("runs/x")
    assert (cfg.sampler, cfg.pruner, cfg.device, cfg.space) == ("tpe", "median", "auto", "default")


def test_config_is_frozen() -> None:
    cfg = _config()
    with pytest.raises(AttributeError):
        cfg.trials = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"model": ""}, r"--model must be a timm model name such as resnet50"),
        ({"model": "   "}, r"--model must be a timm model name such as resnet50"),
        ({"trials": 0}, r"--trials must be a whole number of at least 1, but got 0\."),
        ({"trials": -2}, r"--trials .* but got -2\."),
        ({"trials": 2.5}, r"--trials .* but got 2\.5\."),
        ({"timeout": 0}, r"--timeout must be a positive number of seconds, but got 0\."),
        ({"timeout": -1.0}, r"--timeout must be a positive number of seconds, but got -1\.0\."),
        ({"max_epochs": 0}, r"--max-epochs must be a whole number of at least 1, but got 0\."),
        ({"max_epochs": 1.5}, r"--max-epochs .* but got 1\.5\."),
        ({"image_size": 8}, r"--image-size must be a whole number of pixels from 16 to 4096, but got 8\."),
        ({"val_fraction": 0.0}, r"--val-fraction must lie strictly between 0 and 1, but got 0\.0\."),
        ({"val_fraction": 1.0}, r"--val-fraction .* but got 1\.0\."),
        ({"val_fraction": -0.1}, r"--val-fraction .* but got -0\.1\."),
        ({"sampler": "grid"}, r"--sampler 'grid' is not known; choose one of: tpe, gp, cmaes, random, qmc\."),
        ({"pruner": "asha"}, r"--pruner 'asha' is not known; choose one of: median, hyperband, sha, wilcoxon, none\."),
        ({"device": "tpu"}, r"--device 'tpu' is not known; choose one of: auto, cpu, cuda, mps, cuda:N\."),
        ({"weights": "w.pth", "pretrained": False}, r"--weights and --no-pretrained contradict"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides: dict, pattern: str) -> None:
    with pytest.raises(AutoftError, match=pattern):
        _config(**overrides)


def test_config_accepts_boundary_values() -> None:
    cfg = _config(trials=1, max_epochs=1, image_size=16, val_fraction=0.99, timeout=0.5)
    assert (cfg.trials, cfg.max_epochs, cfg.image_size, cfg.val_fraction) == (1, 1, 16, 0.99)
    assert _config(trials=None, timeout=60.0).trials is None
    assert _config(weights="w.pth", pretrained=True).weights == Path("w.pth")


# --- resolved / save ------------------------------------------------------------------------------


def test_resolved_fills_study_name_run_dir_and_storage(tmp_path: Path) -> None:
    cfg = _config(data=tmp_path / "my flowers").resolved()
    assert cfg.study_name == "test_resnet-my-flowers"
    assert cfg.run_dir == Path("runs") / "test_resnet-my-flowers"
    assert cfg.storage == f"sqlite:///{(Path('runs') / 'test_resnet-my-flowers' / 'study.db').resolve()}"
    assert cfg.trials == 20


def test_resolved_keeps_values_given_and_does_not_mutate(tmp_path: Path) -> None:
    original = _config(study_name="s1", run_dir=tmp_path / "r", storage="sqlite:///x.db", trials=3)
    cfg = original.resolved()
    assert (cfg.study_name, cfg.run_dir, cfg.storage, cfg.trials) == ("s1", tmp_path / "r", "sqlite:///x.db", 3)
    assert _config().study_name is None  # resolved() returns a copy


def test_resolved_storage_follows_a_given_run_dir(tmp_path: Path) -> None:
    cfg = _config(run_dir=tmp_path / "out").resolved()
    assert cfg.storage == f"sqlite:///{(tmp_path / 'out' / 'study.db').resolve()}"


def test_resolved_leaves_trials_open_when_only_a_timeout_bounds_the_search() -> None:
    assert _config(trials=None, timeout=60.0).resolved().trials is None
    assert _config(trials=None).resolved().trials == 20


def test_save_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = _config(data=tmp_path / "data", weights=tmp_path / "w.pth", timeout=90.0, warm_start=False).resolved()
    path = tmp_path / "config.yaml"
    cfg.save(path)
    loaded = yaml.safe_load(path.read_text())
    assert loaded == cfg.to_dict()
    assert loaded["data"] == str(tmp_path / "data")
    assert loaded["weights"] == str(tmp_path / "w.pth")
    assert loaded["run_dir"] == str(cfg.run_dir)
    assert SearchConfig(**loaded) == cfg


def test_a_model_folder_is_stored_absolute_and_names_the_study_by_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    for given, stored in (("./my-model", ""), ("local-dir:my-model/", "local-dir:")):
        config = SearchConfig(model=given, data=Path("data")).resolved()
        assert config.model == stored + str(tmp_path / "my-model")  # best/config.json finds it from any directory
        assert config.study_name == "my-model-data"
    assert SearchConfig(model="hf-hub:org/name", data=Path("data")).model == "hf-hub:org/name"
    assert SearchConfig(model="./missing", data=Path("data")).model == "./missing"  # models.check_name reports it
