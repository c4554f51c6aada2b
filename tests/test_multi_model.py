"""Several models in one search, end to end: real tiny timm models, real SQLite study, real model selection."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import optuna
import pytest
import timm
import torch
from timm.models import save_for_hf

import autoft
from autoft import features, prefix, results, selection
from autoft.cli import main
from autoft.config import SearchConfig
from autoft.preparation import prepare_models
from autoft.tasks.image import models
from conftest import make_image_folder

pytestmark = pytest.mark.slow

# Head-only trials: they train on each model's cached features, so a trial costs little more than its evaluation.
TINY = {"image_size": 16, "max_epochs": 2, "space": "quick", "space_fixed": ("freeze=linear_probe",)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True)


def test_two_models_are_both_searched_and_each_exported_model_reloads_with_its_own_preprocessing(
    data: Path, tmp_path: Path
) -> None:
    # test_resnet wants bilinear resizing and mean/std 0.5; test_efficientnet bicubic and ImageNet's mean/std.
    options = TINY | {"space": "default", "model_selection": False, "keep_top": 2, "pretrained": False}
    result = autoft.search(["test_resnet", "test_efficientnet"], data, trials=2, run_dir=tmp_path / "run", **options)
    searched = [results.knobs(t)["model"] for t in result.study.trials]
    assert searched == ["test_resnet", "test_efficientnet"]  # the portfolio's first recipe on each model
    assert selection.STUDY_ATTR not in result.study.user_attrs  # no selection was measured or recorded

    exported = [result.model_dir, *sorted((tmp_path / "run" / "top").glob("trial-*"))]
    assert {json.loads((f / "config.json").read_text())["model"] for f in exported} == set(searched)
    test_files = sorted((data / "test").glob("*/*.png"))
    for folder in exported:
        meta = json.loads((folder / "config.json").read_text())
        trial = result.study.trials[meta["trial"]]
        assert meta["model"] == results.knobs(trial)["model"]
        expected = models.data_config(models.create(meta["model"], num_classes=3, pretrained=False))
        assert (meta["interpolation"], tuple(meta["mean"])) == (expected["interpolation"], expected["mean"])
        tuned = autoft.load_model(folder)
        assert type(tuned.model).__name__ == type(timm.create_model(meta["model"])).__name__
        predicted = tuned.predict(test_files)
        assert len(predicted) == len(test_files)
    best = json.loads((result.model_dir / "config.json").read_text())
    accuracy = sum(
        p == f.parent.name
        for p, f in zip(autoft.load_model(result.model_dir).predict(test_files), test_files, strict=True)
    )
    assert accuracy / len(test_files) == pytest.approx(result.test_score) == pytest.approx(best["test_accuracy"])


def _local_model(folder: Path, architecture: str, *, zero: bool) -> str:
    """A timm ``local-dir:`` model; ``zero`` makes a broken checkpoint whose features are constant (no signal)."""
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False)
    if zero:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.zero_()
    save_for_hf(model, folder)
    return f"local-dir:{folder}"


def test_a_model_without_useful_features_is_dropped_and_stays_dropped_on_resume(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretrained weights from local folders (no network): a random-init test_efficientnet, whose features still tell
    # the colours apart, and an all-zero test_resnet, whose constant features leave a probe at chance (1/3).
    broken = _local_model(tmp_path / "broken", "test_resnet", zero=True)
    working = _local_model(tmp_path / "working", "test_efficientnet", zero=False)
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="autoft")
    first = autoft.search([broken, working], data, trials=2, run_dir=run, **TINY)
    record = first.study.user_attrs[selection.STUDY_ATTR]
    probe = record["rungs"][0]
    assert record["candidates"] == [broken, working] and len(record["rungs"]) == 1
    assert probe["scores"][broken] == pytest.approx(1 / 3) and probe["scores"][working] > 0.5
    assert probe["kept"] == [working]
    assert f"linear probe dropped {broken} (val acc 0.3333) vs val acc 0." in selection.summary_line(first.study)
    assert {results.knobs(t)["model"] for t in first.study.trials} == {working}
    assert json.loads((first.model_dir / "config.json").read_text())["model"] == working

    caplog.clear()
    second = autoft.search([broken, working], data, trials=3, run_dir=run, **TINY)
    assert "model selection: reusing the study's record" in caplog.text
    assert "linear probe:" not in caplog.text  # nothing measured again
    assert second.study.user_attrs[selection.STUDY_ATTR] == record
    assert len(second.study.trials) == 3
    assert {results.knobs(t)["model"] for t in second.study.trials} == {working}


def test_ctrl_c_during_model_selection_decides_and_queues_nothing(data: Path, tmp_path: Path) -> None:
    def interrupt(event: autoft.Progress) -> None:
        if event.kind == "selection":  # the first probe is about to train
            os.kill(os.getpid(), signal.SIGINT)

    options = TINY | {"space": "default", "pretrained": False}
    with pytest.raises(autoft.SearchInterrupted) as stopped:
        autoft.search(
            "test_resnet,test_efficientnet", data, trials=2, run_dir=tmp_path / "run", progress=interrupt, **options
        )
    assert stopped.value.result is None
    study = optuna.load_study(
        study_name="test_resnet-test_efficientnet-data", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    )
    assert study.trials == [] and selection.STUDY_ATTR not in study.user_attrs  # the next run selects afresh


def test_cli_rejects_bad_model_lists_before_loading_anything(data: Path, tmp_path: Path, capsys) -> None:
    base = ["search", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--no-pretrained"]
    assert main([*base, "--model", "test_resnet,test_resnet"]) == 2
    assert "names test_resnet more than once" in capsys.readouterr().err
    assert main([*base, "--model", "test_resnet,test_efficientnett"]) == 2
    assert "Unknown model 'test_efficientnett'. Did you mean: test_efficientnet" in capsys.readouterr().err
    assert not (tmp_path / "run" / "study.db").exists()


@pytest.mark.ray
def test_on_ray_each_trial_trains_the_model_it_was_given(data: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")  # one trial at a time
    try:
        options = TINY | {"space": "default", "model_selection": False, "keep_top": 2, "pretrained": False}
        result = autoft.search(
            "test_resnet,test_efficientnet", data, trials=2, run_dir=tmp_path / "run", backend="ray", **options
        )
    finally:
        ray.shutdown()
    searched = [results.knobs(t)["model"] for t in result.study.trials]
    assert searched == ["test_resnet", "test_efficientnet"]
    exported = [result.model_dir, *sorted((tmp_path / "run" / "top").glob("trial-*"))]
    for folder in exported:  # the weights trained on the worker load into the model the trial named
        meta = json.loads((folder / "config.json").read_text())
        assert meta["model"] == searched[meta["trial"]]
        autoft.load_model(folder)


def test_the_models_share_the_caches_stated_bounds(data: Path) -> None:
    """k models each get 1/k of the feature and prefix caches' bounds, so together they stay within them."""
    config = SearchConfig(model="test_resnet,test_efficientnet", data=data, pretrained=False, image_size=16)
    setups = prepare_models(config)
    assert sum(s.feature_cache.max_bytes for s in setups.values()) <= features.DEFAULT_MAX_BYTES
    assert sum(s.prefix_cache.max_memory_bytes for s in setups.values()) <= prefix.DEFAULT_MAX_MEMORY_BYTES
    assert sum(s.prefix_cache.max_disk_bytes for s in setups.values()) <= prefix.DEFAULT_MAX_DISK_BYTES
    assert all(s.feature_cache.max_bytes == features.DEFAULT_MAX_BYTES // 2 for s in setups.values())
