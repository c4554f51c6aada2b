"""Custom spaces and strategy pieces in Python, through the runnable example examples/custom_space.py."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from optuna.trial import TrialState

import autoft
import autoft.tasks.image.data
from autoft import pieces
from autoft.config import SearchConfig
from autoft.optim import create_optimizer
from autoft.preparation import prepare
from autoft.space import load_space
from autoft.tasks.image import transforms
from autoft.trial import run_trial
from conftest import make_image_folder

TINY = {"pretrained": False, "image_size": 16, "max_epochs": 2}


def _load_example() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_space.py"
    spec = importlib.util.spec_from_file_location("custom_space_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example() -> Iterator[ModuleType]:
    module = _load_example()
    module.register()
    yield module
    pieces.unregister("freeze", "bias_norm")
    pieces.unregister("optimizer", "rmsprop")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True)


def test_custom_knob_is_unknown_until_its_piece_is_registered() -> None:
    with pytest.raises(autoft.AutoftError, match=r"'rms_alpha' is not a strategy knob.*register_optimizer"):
        autoft.SearchSpace([autoft.Param("rms_alpha", "float", low=0.9, high=0.99)])
    with pytest.raises(autoft.AutoftError, match=r"'bias_norm' is not a known freeze.*register a custom piece"):
        _load_example().yaml_space()


def test_custom_piece_names_become_valid_choices(example: ModuleType) -> None:
    space = load_space(example.yaml_space(), fixed=["freeze=bias_norm", "optimizer=rmsprop"])
    assert {p.name: p.value for p in space.params if p.kind == "fixed"}["freeze"] == "bias_norm"
    with pytest.raises(autoft.AutoftError, match=r"'bias_norx' is not a known freeze \(did you mean 'bias_norm'\?\)"):
        load_space(example.yaml_space(), fixed=["freeze=bias_norx"])


def test_bias_norm_trains_biases_and_head_only_with_the_custom_optimizer(example: ModuleType, data: Path) -> None:
    setup = prepare(SearchConfig(model="test_resnet", data=data, **TINY))
    recipe = autoft.Recipe.from_params({"freeze": "bias_norm", "optimizer": "rmsprop", "rms_alpha": 0.95, "epochs": 1})
    assert recipe.knob("rms_alpha") == 0.95
    outcome = run_trial(setup, recipe, seed=0)
    before = setup.base_model.state_dict()
    changed = {k for k, v in outcome.best_state.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert "conv1.0.weight" not in changed and "layer1.0.conv1.weight" not in changed  # conv weights frozen
    assert "fc.weight" in changed and "conv1.1.bias" in changed  # head and norm biases trained
    model = setup.base_model
    example.bias_norm(model, recipe)
    optimizer = create_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["alpha"] == 0.95


@pytest.mark.slow
def test_define_by_run_space_searches_end_to_end(example: ModuleType, data: Path, tmp_path: Path) -> None:
    result = autoft.search("test_resnet", data, trials=3, space=example.space, run_dir=tmp_path / "run", **TINY)
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:  # the knobs the recipe saw, not Optuna's names (lr_partial / lr_full)
        assert trial.user_attrs["knobs"]["epochs"] == 2 and "lr" in trial.user_attrs["knobs"]
    assert result.best_recipe.epochs == 2
    assert "space: <function space>" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_custom_pieces_search_end_to_end(example: ModuleType, data: Path, tmp_path: Path) -> None:
    space = load_space(example.yaml_space(), fixed=["freeze=bias_norm", "optimizer=rmsprop"])
    result = autoft.search("test_resnet", data, trials=2, space=space, run_dir=tmp_path / "run", **TINY)
    assert all(t.state == TrialState.COMPLETE for t in result.study.trials)
    assert result.best_recipe.freeze == "bias_norm" and 0.9 <= result.best_recipe.knob("rms_alpha") <= 0.999
    meta = json.loads((result.model_dir / "config.json").read_text())
    assert meta["strategy"].startswith("custom freeze bias_norm, rmsprop") and "rms_alpha" in meta["strategy"]


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mix_really_mixes_images_and_targets(mixup: float, cutmix: float) -> None:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1])  # odd batch: timm's Mixup refuses it
    mixed, targets = transforms.mix(images, labels, 3, mixup=mixup, cutmix=cutmix, generator=g)
    assert targets.shape == (5, 3) and torch.allclose(targets.sum(1), torch.ones(5))
    assert (targets.max(1).values < 1).any(), "soft targets: some rows are not one-hot"
    assert not torch.equal(mixed, images), "the images changed"
    own = targets[torch.arange(5), labels]
    changed = (mixed != images).flatten(1).float().mean(1)  # share of each image's values taken from a partner
    if cutmix:  # a box pasted from the partner: the target keeps exactly the untouched share
        other = own < 1  # partner of another class (a same-class partner changes pixels, not the target)
        assert other.any() and torch.allclose(own[other], 1 - changed[other], atol=1e-6)
    else:  # a blend of every pixel
        assert (changed[own < 1] == 1).all()


@pytest.mark.slow
def test_mixing_happens_in_training_when_on_and_never_when_0(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mixed_targets, augmented = [], []
    real_mix, real_augment = transforms.mix, transforms.augment

    def spy_mix(*args, **kwargs):
        out = real_mix(*args, **kwargs)
        mixed_targets.append(out[1])
        return out

    def spy_augment(*args, **kwargs):
        augmented.append(1)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(transforms, "mix", spy_mix)
    monkeypatch.setattr(transforms, "augment", spy_augment)
    setup = prepare(SearchConfig(model="test_resnet", data=data, **TINY))
    steps = 2 * -(-len(setup.dataset.train) // 8)  # 2 epochs of batches of 8
    on = autoft.Recipe(freeze="full", epochs=2, batch_size=8, mixup=0.2, cutmix=1.0, label_smoothing=0.1)
    outcome = run_trial(setup, on, seed=0)
    assert len(outcome.history) == 2 and outcome.history[0].train_loss > 0
    assert len(mixed_targets) == steps and all(t.dtype.is_floating_point for t in mixed_targets)
    assert any((t.max(1).values < 1).any() for t in mixed_targets)  # the loss saw soft targets
    mixed_targets.clear(), augmented.clear()
    off = autoft.Recipe(freeze="full", epochs=2, batch_size=8, mixup=0.0, cutmix=0.0)
    run_trial(setup, off, seed=0)
    assert len(augmented) == steps and mixed_targets == []  # every batch took the image path, none was mixed
