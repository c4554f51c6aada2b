"""Tests for the prefix cache of the text tasks: a tiny random BERT split by its own ``split_blocks`` reproduces its
forward at every cut, and partial fine-tunes on cached activations equal the uncached ones (sentences and NER)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autoft import blocks, prefix
from autoft.config import SearchConfig
from autoft.prefix import PrefixCache
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.trial import TrialOutcome, run_trial
from test_features import _assert_same_outcome
from textdata import sentences, tagged, write_conll, write_csv, write_tiny_bert

KINDS = ["text", "ner"]


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Setup]:
    root = tmp_path_factory.mktemp("text-prefix")
    bert = write_tiny_bert(root / "tiny-bert")  # 3 block groups: embeddings, layer 0, layer 1
    data = {
        "text": write_csv(root / "reviews.csv", sentences(40)),
        "ner": write_conll(root / "train.conll", tagged(30)),
    }
    return {kind: prepare(SearchConfig(model=str(bert), data=path, device="cpu")) for kind, path in data.items()}


def _with_cache(setup: Setup, **options) -> tuple[Setup, PrefixCache]:
    cache = PrefixCache(setup.base_model, setup.dataset, setup.task, setup.spec, device=setup.device, **options)
    return dataclasses.replace(setup, feature_cache=None, prefix_cache=cache), cache


def _run(setup: Setup, train_blocks: int) -> TrialOutcome:
    freeze = {"freeze": "partial", "train_blocks": train_blocks} if train_blocks else {"freeze": "linear_probe"}
    recipe = Recipe.from_params({**freeze, "epochs": 2, "batch_size": 8, "lr": 1e-3, "augment": "none"})
    return run_trial(setup, recipe, seed=3)


def _uncached(setup: Setup, train_blocks: int) -> TrialOutcome:
    return _run(dataclasses.replace(setup, feature_cache=None, prefix_cache=None), train_blocks)


@pytest.mark.parametrize("kind", KINDS)
def test_every_cut_reproduces_the_models_forward(setups: dict[str, Setup], kind: str) -> None:
    setup = setups[kind]
    model = setup.base_model.eval()
    inputs, _ = next(iter(setup.task.batches(setup.dataset.val, batch_size=4, shuffle=False)))
    assert (inputs["attention_mask"] == 0).any()  # padded examples among them
    groups = blocks.block_groups(model)
    for start in range(1, len(groups) + 1):  # the last cut is before the head: every layer frozen
        split = prefix.split_model(model, start)
        assert isinstance(split, prefix.Split), split
        with torch.no_grad():
            activations = split.prefix(inputs)
            torch.testing.assert_close(split.suffix(activations), model(inputs), rtol=1e-4, atol=1e-5)
        assert activations.shape == (*inputs["input_ids"].shape, 1 + model.num_features)  # the mask, then hidden
        assert torch.equal(activations[..., 0], inputs["attention_mask"].float())
        suffix_params = {id(p) for p in split.suffix.parameters()}
        first_trained = groups[start][0] if start < len(groups) else "head.weight"
        assert id(model.get_parameter(first_trained)) in suffix_params
        assert not suffix_params & {id(p) for p in split.prefix.parameters()}


@pytest.mark.parametrize("train_blocks", [0, 1, 2])  # 0: a linear probe, the head alone on the last layer's output
@pytest.mark.parametrize("kind", KINDS)
def test_cached_partial_fine_tune_equals_the_uncached_one(
    setups: dict[str, Setup], kind: str, train_blocks: int
) -> None:
    setup, cache = _with_cache(setups[kind])
    assert setup.base_model.encoder.config.hidden_dropout_prob > 0  # in the frozen embeddings and layers: off
    cached = _run(setup, train_blocks)
    assert cache.bytes_in("memory") > 0  # built and used
    # The suffix cuts training batches to their longest example as the uncached ones are cut, so the trainable layers
    # draw the same dropout masks (without the cut the sentence trials differ); what is left is float rounding.
    _assert_same_outcome(cached, _uncached(setup, train_blocks))


@pytest.mark.parametrize("kind", KINDS)
def test_the_entry_is_the_splits_full_width_with_padding_masked_out(setups: dict[str, Setup], kind: str) -> None:
    setup, cache = _with_cache(setups[kind], batch_size=4)  # fill batches narrower than the split
    train, val = cache.activations(train_blocks=1)
    for cached, split in ((train, setup.dataset.train), (val, setup.dataset.val)):
        assert cached.images.shape == (len(split), split.max_length, 1 + setup.base_model.num_features)
        scored = torch.arange(split.max_length) < split.lengths[:, None]
        assert torch.equal(cached.images[..., 0], scored.float())  # the mask channel: each example's tokens
        assert torch.equal(cached.labels, split.labels)
    # Filled by length in batches of 4, each cut to its longest example: past that width an entry is zeros.
    shortest = setup.task.eval_order(setup.dataset.train)[:4]
    width = int(setup.dataset.train.lengths[shortest].max())
    assert width < setup.dataset.train.max_length
    assert (train.images[shortest, width:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_past_the_memory_bound_the_cache_spills_to_disk_with_the_same_result(
    setups: dict[str, Setup], kind: str, tmp_path: Path
) -> None:
    setup, cache = _with_cache(setups[kind], spill_dir=tmp_path / "prefix_cache", max_memory_bytes=100)
    cached = _run(setup, 1)
    assert cache.bytes_in("memory") == 0 and cache.bytes_in("disk") > 0
    assert list((tmp_path / "prefix_cache").iterdir()) == []  # unlinked once mapped
    _assert_same_outcome(cached, _uncached(setup, 1))
