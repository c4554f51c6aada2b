"""Tests for autoft.prefix: partial fine-tuning on cached frozen-prefix activations equals the uncached path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from autoft import blocks, prefix
from autoft.prefix import PrefixCache
from autoft.recipe import Recipe
from autoft.tasks.base import Dataset
from autoft.tasks.image import data
from autoft.trial import TrialOutcome, run_trial
from conftest import colour_split, image_setup
from test_features import MODELS, SIZE, _assert_same_outcome, _model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset() -> data.Dataset:
    return Dataset(
        ("r", "g", "b"), colour_split(8, seed=0), colour_split(4, seed=1), None, Path("."), 0, image_size=SIZE
    )


def _cache(model: nn.Module, dataset: data.Dataset, **options) -> PrefixCache:
    setup = image_setup(model, dataset)
    return PrefixCache(model, dataset, setup.task, setup.spec, device=CPU, **options)


def _run(model: nn.Module, recipe: Recipe, dataset: data.Dataset, cache: PrefixCache | None) -> TrialOutcome:
    return run_trial(image_setup(model, dataset, prefix_cache=cache), recipe, seed=3)


def _partial(train_blocks: int = 2, **fields) -> Recipe:
    params = {"freeze": "partial", "train_blocks": train_blocks, "epochs": 2, "batch_size": 8, "lr": 1e-2}
    return Recipe.from_params(params | {"augment": "none"} | fields)


@pytest.mark.parametrize("name", MODELS)
def test_cached_partial_fine_tune_equals_the_uncached_one(dataset: data.Dataset, name: str) -> None:
    model = _model(name)
    cache = _cache(model, dataset)
    cached = _run(model, _partial(), dataset, cache)
    assert cache.bytes_in("memory") > 0  # built and used
    # Prefix activations computed in batches of 256 round differently (~1e-7) from the training batches; once the
    # loss is ~1e-3, Adam's normalized steps turn that into weight differences up to ~1e-4 (seen with 1 thread).
    _assert_same_outcome(cached, _run(model, _partial(), dataset, None), weight_atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the device is named without its index")
def test_on_cuda_a_cached_partial_fine_tune_runs_with_its_labels_beside_the_activations(
    dataset: data.Dataset,
) -> None:
    """The first GPU run (2026-12-04): a cache made for device ``cuda`` held activations on ``cuda:0`` and compared
    the two as different, so it left the labels on the CPU and every cached partial trial failed in index_select."""
    model, cuda = _model(MODELS[0]), torch.device("cuda")
    setup = image_setup(model, dataset, device=cuda, prefix_cache="build")
    outcome = run_trial(setup, _partial(), seed=3)
    assert setup.prefix_cache.bytes_in("memory") > 0 and outcome.best_epoch >= 0
    for split in setup.prefix_cache.activations(train_blocks=2):
        assert split.labels.device == split.images.device


@pytest.mark.parametrize("name", MODELS)
def test_every_cut_reproduces_the_models_forward(name: str) -> None:
    model = _model(name).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    groups = blocks.block_groups(model)
    for start in range(1, len(groups) + 1):  # the last cut is before the head (a linear probe without features)
        split = prefix.split_model(model, start)
        assert isinstance(split, prefix.Split), split
        with torch.no_grad():
            torch.testing.assert_close(split.suffix(split.prefix(images)), model(images), rtol=1e-4, atol=1e-5)
        suffix_params = {id(p) for p in split.suffix.parameters()}
        trainable = groups[start][0] if start < len(groups) else sorted(blocks.head_parameter_names(model))[0]
        assert id(model.get_parameter(trainable)) in suffix_params  # the trial's own parameters train


def test_past_the_memory_bound_the_cache_spills_to_disk_with_the_same_result(
    dataset: data.Dataset, tmp_path: Path
) -> None:
    model = _model("test_efficientnet")
    cache = _cache(model, dataset, spill_dir=tmp_path / "prefix_cache", max_memory_bytes=100)
    cached = _run(model, _partial(), dataset, cache)
    assert cache.bytes_in("memory") == 0 and cache.bytes_in("disk") > 0
    assert list((tmp_path / "prefix_cache").iterdir()) == []  # unlinked once mapped: nothing left behind
    _assert_same_outcome(cached, _run(model, _partial(), dataset, None), weight_atol=1e-3)


def test_past_both_bounds_trials_take_the_uncached_path(dataset: data.Dataset, tmp_path: Path) -> None:
    model = _model("test_efficientnet")
    cache = _cache(model, dataset, spill_dir=tmp_path, max_memory_bytes=100, max_disk_bytes=100)
    assert cache.activations(train_blocks=2) is None
    assert cache.bytes_in("memory") == cache.bytes_in("disk") == 0
    assert _cache(model, dataset, max_memory_bytes=100).activations(train_blocks=2) is None  # no spill dir


def test_the_memory_bound_counts_every_entry(dataset: data.Dataset, tmp_path: Path) -> None:
    model = _model("test_efficientnet")
    one = _cache(model, dataset).activations(train_blocks=1)
    size = sum(s.images.numel() * 4 for s in one)
    cache = _cache(model, dataset, spill_dir=tmp_path, max_memory_bytes=size)
    cache.activations(train_blocks=1)
    cache.activations(train_blocks=2)  # its activations are bigger than what is left in memory
    assert cache.bytes_in("memory") == size and cache.bytes_in("disk") > 0


def test_one_entry_per_group_serves_every_trial(dataset: data.Dataset) -> None:
    model = _model("test_efficientnet")
    cache = _cache(model, dataset)
    _run(model, _partial(epochs=1), dataset, cache)
    first = cache.activations(train_blocks=2)
    _run(model, _partial(lr=1e-3, epochs=1), dataset, cache)
    assert cache.activations(train_blocks=2)[0] is first[0]
    train, val = first
    assert train.images.shape[0] == len(dataset.train) and torch.equal(val.labels, dataset.val.labels)


def test_a_short_trial_in_rounds_builds_no_cache_it_would_not_repay(dataset: data.Dataset) -> None:
    # The build is a forward pass over 24 train + 12 val images; 1 round of 8 (and its validation) covers 20.
    model = _model("test_efficientnet")
    cache = _cache(model, dataset)
    short = _run(model, _partial(epochs=1, epoch_examples=8), dataset, cache)
    assert cache.bytes_in("memory") == 0 and not cache.built(train_blocks=2) and len(short.history) == 1
    _run(model, _partial(epochs=2, epoch_examples=8), dataset, cache)  # 2 x (8 + 12) = 40 >= 36: it pays
    assert cache.built(train_blocks=2) and cache.bytes_in("memory") > 0
    # Equal results either way (the uncached and cached paths agree, as above).
    _assert_same_outcome(
        _run(model, _partial(epochs=2, epoch_examples=8), dataset, None),
        _run(model, _partial(epochs=2, epoch_examples=8), dataset, cache),
        weight_atol=1e-3,
    )


@pytest.mark.parametrize(
    "fields",
    [{"augment": "light"}, {"mixup": 0.2}, {"freeze": "full"}, {"train_blocks": 9}],
    ids=["augment", "mixup", "full", "all-blocks"],
)
def test_the_cache_is_not_used_when_inputs_vary_or_nothing_is_frozen(dataset: data.Dataset, fields: dict) -> None:
    model = _model("test_efficientnet")
    cache = _cache(model, dataset)
    _run(model, _partial(epochs=1, **fields), dataset, cache)
    assert cache.bytes_in("memory") == 0


@pytest.mark.parametrize("name", MODELS)
def test_a_linear_probe_without_the_feature_cache_trains_the_head_on_cached_activations(
    dataset: data.Dataset, name: str
) -> None:
    model, probe = _model(name), _partial(freeze="linear_probe")
    cache = _cache(model, dataset)  # no feature cache in this setup (a per-token head has no pooled features)
    cached = _run(model, probe, dataset, cache)
    assert cache.built(train_blocks=0) and cache.bytes_in("memory") > 0  # the cut before the head
    _assert_same_outcome(cached, _run(model, probe, dataset, None), weight_atol=1e-3)


def test_a_stochastic_prefix_is_not_cached_and_says_why(
    dataset: data.Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model("test_vit")
    model.pos_drop.p = 0.1  # dropout before the first block: the prefix's output changes every epoch
    with caplog.at_level(logging.DEBUG, logger="autoft.prefix"):
        assert _cache(model, dataset).activations(train_blocks=2) is None
    assert "in the frozen prefix, pos_drop is dropout with p=0.1" in caplog.text


def test_dropout_inside_frozen_blocks_does_not_stop_the_cache(dataset: data.Dataset) -> None:
    model = _model("test_vit")
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Dropout):
            module.p = 0.1  # off in the frozen blocks (eval mode); drawn alike by both paths in the trainable ones
    cache = _cache(model, dataset)
    cached = _run(model, _partial(), dataset, cache)
    assert cache.bytes_in("memory") > 0
    _assert_same_outcome(cached, _run(model, _partial(), dataset, None), weight_atol=1e-3)


def test_a_model_fx_cannot_split_falls_back() -> None:
    class Branchy(nn.Module):  # no group_matcher: grouped by top-level children; two tensors cross every cut
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def get_classifier(self) -> nn.Module:
            return self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(self.a(x)) + x)

    assert "2 values cross the cut" in prefix.split_model(Branchy(), 1)


def test_a_search_setup_shares_one_prefix_cache_that_spills_under_the_run_dir(tmp_path: Path) -> None:
    from autoft.config import SearchConfig
    from autoft.preparation import prepare
    from conftest import make_image_folder

    data_dir = make_image_folder(tmp_path / "data", per_class=4, size=(16, 16))
    config = SearchConfig(model="test_resnet", data=data_dir, pretrained=False, image_size=16, run_dir=tmp_path / "run")
    setup = prepare(config)
    assert setup.prefix_cache.base_model is setup.base_model
    assert setup.prefix_cache.spill_dir == tmp_path / "run" / "prefix_cache"
