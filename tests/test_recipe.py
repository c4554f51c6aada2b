"""Tests for autoft.recipe: building from a space's values, clamping, freeze schedule, descriptions."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autoft.errors import AutoftError
from autoft.recipe import BASELINE, FREEZE_MODES, Recipe

# --- from_params ----------------------------------------------------------------------------------


def test_from_params_empty_gives_the_defaults() -> None:
    assert Recipe.from_params({}) == Recipe()
    recipe = Recipe()
    assert (recipe.freeze, recipe.optimizer, recipe.lr, recipe.epochs, recipe.schedule) == (
        "full",
        "adamw",
        1e-3,
        10,
        "cosine",
    )


def test_from_params_takes_given_values_and_defaults_the_rest() -> None:
    recipe = Recipe.from_params({"freeze": "partial", "train_blocks": 3, "lr": 3e-4, "batch_size": 32})
    assert (recipe.freeze, recipe.train_blocks, recipe.lr, recipe.batch_size) == ("partial", 3, 3e-4, 32)
    assert recipe.optimizer == Recipe().optimizer
    assert recipe.weight_decay == Recipe().weight_decay


def test_from_params_rejects_unknown_keys_listing_the_known_ones() -> None:
    with pytest.raises(AutoftError) as info:
        Recipe.from_params({"lr": 1e-3, "dropout": 0.1, "beta9": 2})
    message = str(info.value)
    assert "dropout, beta9" not in message  # sorted
    assert "beta9, dropout are not fine-tuning knobs" in message
    assert "known knobs:" in message
    for field in dataclasses.fields(Recipe):
        if field.name != "extra":  # the knobs of custom pieces, not a knob itself
            assert field.name in message


@pytest.mark.parametrize(
    ("params", "warmup", "lp"),
    [
        ({"epochs": 3, "warmup_epochs": 5}, 2, 1),
        ({"epochs": 3, "warmup_epochs": 2, "lp_epochs": 3}, 2, 2),
        ({"epochs": 1, "warmup_epochs": 2, "lp_epochs": 1}, 0, 0),
        ({"epochs": 10, "warmup_epochs": 2, "lp_epochs": 3}, 2, 3),
    ],
)
def test_from_params_leaves_at_least_one_main_epoch(params: dict, warmup: int, lp: int) -> None:
    recipe = Recipe.from_params(params)
    assert (recipe.warmup_epochs, recipe.lp_epochs) == (warmup, lp)
    assert recipe.warmup_epochs < recipe.epochs
    assert recipe.lp_epochs < recipe.epochs


def test_recipe_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().lr = 1.0  # type: ignore[misc]


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"freeze": "half"}, r"freeze='half' is not known; choose one of: linear_probe, partial, full, lp_ft"),
        ({"optimizer": "lamb"}, r"optimizer='lamb' is not known; choose one of: sgd, adam, adamw"),
        ({"schedule": "step"}, r"schedule='step' is not known; choose one of: cosine, constant"),
        ({"epochs": 0}, r"epochs >= 1.*epochs=0"),
        ({"batch_size": 0}, r"batch_size >= 1.*batch_size=0"),
        ({"lr": 0.0}, r"lr > 0.*lr=0\.0"),
        ({"lr": -1e-3}, r"lr > 0.*lr=-0\.001"),
        # Found by these tests: each used to be accepted and fail (or train wrongly) only inside a trial.
        ({"lr": math.nan}, r"lr > 0.*lr=nan"),
        ({"augment": "heavy"}, r"augment='heavy' is not known; choose one of: none, light, strong"),
        ({"train_blocks": -1}, r"train_blocks=-1 is out of range; it must be >= 0"),
        ({"lp_epochs": -1}, r"lp_epochs=-1 is out of range"),
        ({"warmup_epochs": -2}, r"warmup_epochs=-2 is out of range"),
        ({"head_lr_ratio": 0.0}, r"head_lr_ratio=0\.0 is out of range; it must be > 0"),
        ({"head_lr_ratio": -10.0}, r"head_lr_ratio=-10\.0 is out of range"),
        ({"layer_decay": -0.5}, r"layer_decay=-0\.5 is out of range; it must be > 0"),
        ({"weight_decay": -0.1}, r"weight_decay=-0\.1 is out of range; it must be >= 0"),
        ({"momentum": 1.0}, r"momentum=1\.0 is out of range; it must be in \(0, 1\)"),
        ({"momentum": 0.0}, r"momentum=0\.0 is out of range"),  # timm's Nesterov SGD raises on 0
        ({"label_smoothing": 1.5}, r"label_smoothing=1\.5 is out of range"),
    ],
)
def test_invalid_field_values_are_rejected_naming_field_and_value(fields: dict, pattern: str) -> None:
    with pytest.raises(AutoftError, match=pattern):
        Recipe(**fields)
    with pytest.raises(AutoftError, match=pattern):
        Recipe.from_params(fields)


def test_baseline_is_a_valid_full_fine_tune_with_adam() -> None:
    assert (BASELINE.freeze, BASELINE.optimizer, BASELINE.lr, BASELINE.head_lr_ratio) == ("full", "adam", 1e-3, 1.0)


# --- train_blocks_at ------------------------------------------------------------------------------


def test_train_blocks_at_for_each_freeze_mode() -> None:
    epochs = range(6)
    assert [Recipe(freeze="linear_probe").train_blocks_at(e) for e in epochs] == [0] * 6
    assert [Recipe(freeze="partial", train_blocks=3).train_blocks_at(e) for e in epochs] == [3] * 6
    assert [Recipe(freeze="full").train_blocks_at(e) for e in epochs] == [None] * 6


def test_train_blocks_at_switches_from_head_only_to_all_after_lp_epochs() -> None:
    recipe = Recipe.from_params({"freeze": "lp_ft", "lp_epochs": 2, "epochs": 5})
    assert [recipe.train_blocks_at(e) for e in range(5)] == [0, 0, None, None, None]


def test_lp_ft_with_one_epoch_has_no_probe_phase() -> None:
    recipe = Recipe.from_params({"freeze": "lp_ft", "lp_epochs": 3, "epochs": 1})
    assert recipe.train_blocks_at(0) is None


def test_every_freeze_mode_is_handled() -> None:
    for mode in FREEZE_MODES:
        Recipe(freeze=mode).train_blocks_at(0)
        assert Recipe(freeze=mode).describe()


# --- describe -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (
            {"freeze": "partial", "train_blocks": 2, "lr": 3e-4},
            "last 2 block groups, adamw lr 3e-04, head lr x10, 10 epochs, cosine, augment light",
        ),
        ({}, "full fine-tune, adamw lr 1e-03, head lr x10, 10 epochs, cosine, augment light"),
        (
            {"freeze": "linear_probe", "layer_decay": 0.5, "epochs": 3, "schedule": "constant", "augment": "none"},
            "linear probe (head only), adamw lr 1e-03, 3 epochs, constant, augment none",
        ),
        (
            {
                "freeze": "lp_ft",
                "lp_epochs": 2,
                "optimizer": "sgd",
                "lr": 0.05,
                "head_lr_ratio": 31.6228,
                "layer_decay": 0.75,
                "label_smoothing": 0.1,
                "augment": "strong",
            },
            "LP-FT (2 head-only epochs, then all), sgd lr 5e-02, head lr x31.6, layer decay 0.75, "
            "10 epochs, cosine, label smoothing 0.10, augment strong",
        ),
    ],
)
def test_describe_says_the_strategy_in_words(fields: dict, text: str) -> None:
    assert Recipe.from_params(fields).describe() == text
