"""Tests for autoft.features: head-only trials on cached pooled features equal the uncached path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from autoft import tasks
from autoft.cli import main
from autoft.features import FeatureCache
from autoft.recipe import Recipe
from autoft.tasks.base import Dataset
from autoft.tasks.image import data, models, transforms
from autoft.trial import TrialOutcome, run_trial
from conftest import colour_split, image_setup, make_image_folder

CPU = torch.device("cpu")
SIZE = 16
MODELS = ["test_resnet", "test_efficientnet", "test_vit"]


@pytest.fixture(scope="module")
def dataset() -> data.Dataset:
    return Dataset(
        ("r", "g", "b"), colour_split(8, seed=0), colour_split(4, seed=1), None, Path("."), 0, image_size=SIZE
    )


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=3, pretrained=False)


def _cache(model: nn.Module, dataset: data.Dataset) -> FeatureCache:
    return image_setup(model, dataset, feature_cache="build").feature_cache


def _run(model: nn.Module, recipe: Recipe, dataset: data.Dataset, cache: FeatureCache | None) -> TrialOutcome:
    return run_trial(image_setup(model, dataset, feature_cache=cache), recipe, seed=3)


def _assert_same_outcome(cached: TrialOutcome, plain: TrialOutcome, *, weight_atol: float = 1e-5) -> None:
    assert cached.best_epoch == plain.best_epoch
    assert cached.best_score == pytest.approx(plain.best_score)
    assert len(cached.history) == len(plain.history)
    for a, b in zip(cached.history, plain.history, strict=True):
        assert (a.train_loss, a.val_loss, a.val_accuracy) == pytest.approx(
            (b.train_loss, b.val_loss, b.val_accuracy), rel=1e-4, abs=1e-5
        )
    assert cached.best_state.keys() == plain.best_state.keys()
    for key, value in plain.best_state.items():
        torch.testing.assert_close(cached.best_state[key], value, rtol=1e-4, atol=weight_atol, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_pooled_features_through_the_classifier_equal_the_models_forward(dataset: data.Dataset, name: str) -> None:
    model = _model(name).eval()
    cache = _cache(model, dataset)
    train, val = cache.splits()
    with torch.no_grad():
        direct = model(transforms.normalize(dataset.val.images, mean=cache.spec.mean, std=cache.spec.std))
        via_cache = model.get_classifier()(val.images)
    torch.testing.assert_close(via_cache, direct, rtol=1e-4, atol=1e-5)
    assert train.images.shape == (len(dataset.train), model.num_features)
    assert torch.equal(train.labels, dataset.train.labels)
    assert cache.nbytes == (len(dataset.train) + len(dataset.val)) * model.num_features * 4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("freeze", ["linear_probe", "lp_ft"])
def test_cached_trial_equals_the_uncached_trial(dataset: data.Dataset, name: str, freeze: str) -> None:
    model = _model(name)
    recipe = Recipe.from_params(
        {"freeze": freeze, "lp_epochs": 2, "epochs": 3, "batch_size": 8, "lr": 3e-2, "augment": "none"}
    )
    cache = _cache(model, dataset)
    cached = _run(model, recipe, dataset, cache)
    assert cache.nbytes > 0  # the cache was built and used
    _assert_same_outcome(cached, _run(model, recipe, dataset, None))


def test_one_cache_serves_every_trial_and_is_built_once(dataset: data.Dataset) -> None:
    model = _model("test_resnet")
    cache = _cache(model, dataset)
    recipe = Recipe.from_params({"freeze": "linear_probe", "epochs": 2, "batch_size": 8, "augment": "none"})
    _run(model, recipe, dataset, cache)
    first = cache.splits()
    _run(model, recipe, dataset, cache)
    assert cache.splits() is first


@pytest.mark.parametrize(
    "fields",
    [{"augment": "light"}, {"mixup": 0.2}, {"cutmix": 1.0}, {"freeze": "partial", "train_blocks": 1}],
    ids=["augment", "mixup", "cutmix", "partial"],
)
def test_the_cache_is_not_used_when_inputs_vary_or_blocks_train(dataset: data.Dataset, fields: dict) -> None:
    model = _model("test_resnet")
    recipe = Recipe.from_params({"freeze": "linear_probe", "epochs": 1, "batch_size": 8, "augment": "none"} | fields)
    cache = _cache(model, dataset)
    _run(model, recipe, dataset, cache)
    assert cache.nbytes == 0


def test_a_cache_of_another_model_is_ignored(dataset: data.Dataset) -> None:
    model, other = _model("test_resnet"), _model("test_resnet")
    cache = _cache(other, dataset)
    recipe = Recipe.from_params({"freeze": "linear_probe", "epochs": 1, "batch_size": 8, "augment": "none"})
    _run(model, recipe, dataset, cache)
    assert cache.nbytes == 0


def test_stochastic_models_are_not_cached(dataset: data.Dataset) -> None:
    torch.manual_seed(0)
    model = models.create("test_resnet", num_classes=3, pretrained=False)
    model.drop_rate = 0.5  # dropout before the classifier: features differ between epochs
    assert _cache(model, dataset).splits() is None


def test_features_past_the_memory_bound_are_not_cached(dataset: data.Dataset) -> None:
    model = _model("test_resnet")
    cache = _cache(model, dataset)
    cache.max_bytes = 100
    assert cache.splits() is None
    assert "bound" in cache._refused


def test_the_image_task_knows_which_recipes_feed_the_same_inputs_every_epoch() -> None:
    image = tasks.get("image")
    assert image.deterministic(Recipe(augment="none"))
    assert not image.deterministic(Recipe(augment="none", mixup=0.1))
    assert not image.deterministic(Recipe(augment="strong"))


def test_a_cached_linear_probe_is_faster(dataset: data.Dataset) -> None:
    model = _model("test_efficientnet")
    recipe = Recipe.from_params({"freeze": "linear_probe", "epochs": 4, "batch_size": 4, "augment": "none"})
    cache = _cache(model, dataset)
    cache.splits()  # built once per search, outside the trials
    started = time.perf_counter()
    _run(model, recipe, dataset, cache)
    cached = time.perf_counter() - started
    started = time.perf_counter()
    _run(model, recipe, dataset, None)
    assert cached < time.perf_counter() - started


def test_compile_is_a_checked_config_flag(tmp_path: Path) -> None:
    from autoft.cli import _parser
    from autoft.cli.search import _config
    from autoft.config import SearchConfig
    from autoft.errors import AutoftError

    assert SearchConfig(model="test_resnet", data=tmp_path, compile=True).compile
    with pytest.raises(AutoftError, match="compile must be True or False"):
        SearchConfig(model="test_resnet", data=tmp_path, compile="yes")
    args = _parser().parse_args(["search", "--model", "test_resnet", "--data", str(tmp_path), "--compile"])
    assert _config(args).compile


@pytest.mark.slow
@pytest.mark.parametrize("flag", [True, False], ids=["compile", "no-compile"])
def test_compile_flag_runs_each_trial_s_training_forward_through_torch_compile(
    tmp_path: Path, flag: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # A stand-in for torch.compile (a real compile on CPU needs a C++ toolchain and minutes): it records what it
    # compiled and counts the calls that go through the compiled callable.
    compiled, forwards = [], []

    def fake_compile(module: torch.nn.Module, *args: object, **kwargs: object):
        compiled.append(module)

        def forward(*inputs: torch.Tensor) -> torch.Tensor:
            forwards.append(inputs[0].shape[0])
            return module(*inputs)

        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    data = make_image_folder(tmp_path / "data", per_class=6, size=(16, 16))
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  freeze: full\n  epochs: 2\n  batch_size: 8\n  lr: 1.0e-3\n")
    args = ["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data), "--space", str(space),
            "--trials", "2", "--image-size", "16", "--no-warm-start", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--compile"] if flag else args) == 0, capsys.readouterr().err
    if not flag:
        assert compiled == [] and forwards == []
        return
    assert len(compiled) == 2  # once per trial (freeze full: one set of trainable blocks)
    assert all(isinstance(m, torch.nn.Module) and m.get_classifier().out_features == 3 for m in compiled)
    assert forwards == [8, 8, 2] * 4  # 18 training images: every step of 2 epochs x 2 trials went through it
