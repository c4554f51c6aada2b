"""Tests for autoft.optim: parameter groups, the learning-rate schedule and optimizer construction."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from autoft import blocks, optim
from autoft.recipe import Recipe
from autoft.tasks.image import models

TINY = ["test_resnet", "test_efficientnet", "test_vit"]

_MODELS: dict[str, nn.Module] = {}


def _model(name: str = "test_resnet") -> nn.Module:
    """A fresh tiny model (built once per name, then deep-copied: creation is the slow part)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = models.create(name, num_classes=3, pretrained=False)
    return copy.deepcopy(_MODELS[name])


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _scale_of(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    return {n: g["lr_scale"] for g in groups for n in _names(model, g)}


# --- param_groups ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_param_groups_cover_every_trainable_parameter_once(name: str) -> None:
    model = _model(name)
    groups = optim.param_groups(model, Recipe())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", TINY)
def test_linear_probe_groups_hold_only_the_head(name: str) -> None:
    model = _model(name)
    blocks.apply_freeze(model, train_blocks=0)
    groups = optim.param_groups(model, Recipe(head_lr_ratio=7.0, layer_decay=0.5))
    assert set().union(*(_names(model, g) for g in groups)) == blocks.head_parameter_names(model)
    assert {g["lr_scale"] for g in groups} == {7.0}


def test_partial_freeze_groups_hold_only_trainable_parameters() -> None:
    model = _model()
    blocks.apply_freeze(model, train_blocks=1)
    groups = optim.param_groups(model, Recipe())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*(_names(model, g) for g in groups)) == trainable
    assert trainable == set(blocks.block_groups(model)[-1]) | blocks.head_parameter_names(model)


@pytest.mark.parametrize("ratio", [1.0, 10.0, 55.5])
def test_head_group_scale_is_head_lr_ratio(ratio: float) -> None:
    model = _model()
    scales = _scale_of(model, optim.param_groups(model, Recipe(head_lr_ratio=ratio)))
    for name in blocks.head_parameter_names(model):
        assert scales[name] == ratio
    backbone = {s for n, s in scales.items() if n not in blocks.head_parameter_names(model)}
    assert backbone == {1.0}  # layer_decay 1.0: every block at the base rate


@pytest.mark.parametrize("name", TINY)
def test_layer_decay_scales_increase_from_stem_to_last_block(name: str) -> None:
    model = _model(name)
    decay = 0.5
    scales = _scale_of(model, optim.param_groups(model, Recipe(layer_decay=decay, head_lr_ratio=10.0)))
    groups = blocks.block_groups(model)
    per_block = []
    for i, group in enumerate(groups):
        group_scales = {scales[n] for n in group}
        assert group_scales == {decay ** (len(groups) - i)}  # one scale per block group
        per_block.append(group_scales.pop())
    assert per_block == sorted(per_block)
    assert len(set(per_block)) == len(groups)
    assert per_block[-1] == decay  # the last block is one step below the head's base rate


@pytest.mark.parametrize("name", TINY)
def test_no_weight_decay_on_biases_and_norms(name: str) -> None:
    model = _model(name)
    groups = optim.param_groups(model, Recipe(weight_decay=0.03))
    for group in groups:
        dims = {p.ndim for p in group["params"]}
        if group["weight_decay"] == 0.0:
            assert max(dims) <= 1
        else:
            assert group["weight_decay"] == 0.03
            assert min(dims) >= 2
    assert any(g["weight_decay"] == 0.0 for g in groups)
    assert any(g["weight_decay"] == 0.03 for g in groups)


# --- lr_factor ------------------------------------------------------------------------------------


def test_lr_factor_warms_up_linearly() -> None:
    factors = [optim.lr_factor(s, total_steps=100, warmup_steps=4, schedule="cosine") for s in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]


def test_lr_factor_cosine_decays_from_one_to_zero() -> None:
    f = [optim.lr_factor(s, total_steps=110, warmup_steps=10, schedule="cosine") for s in range(10, 111)]
    assert f[0] == 1.0
    assert f[50] == pytest.approx(0.5)
    assert f[25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(f))
    assert optim.lr_factor(500, total_steps=110, warmup_steps=10, schedule="cosine") == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_without_warmup_starts_at_one() -> None:
    assert optim.lr_factor(0, total_steps=10, warmup_steps=0, schedule="cosine") == 1.0
    assert optim.lr_factor(5, total_steps=10, warmup_steps=0, schedule="cosine") == pytest.approx(0.5)


def test_lr_factor_constant_after_warmup() -> None:
    f = [optim.lr_factor(s, total_steps=20, warmup_steps=2, schedule="constant") for s in range(20)]
    assert f[:2] == [0.5, 1.0]
    assert f[2:] == [1.0] * 18


# --- create_optimizer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opt", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_create_optimizer_sets_each_group_rate_to_base_times_scale(opt: str, cls: type) -> None:
    model = _model()
    recipe = Recipe(optimizer=opt, lr=0.02, head_lr_ratio=5.0, layer_decay=0.5, weight_decay=0.01, momentum=0.8)
    optimizer = optim.create_optimizer(model, recipe)
    assert isinstance(optimizer, cls)
    assert len(optimizer.param_groups) == len(optim.param_groups(model, recipe))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.02 * group["lr_scale"])
        assert group["weight_decay"] in (0.0, 0.01)
        if opt == "sgd":
            assert group["momentum"] == 0.8
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(0.1)


def test_create_optimizer_skips_frozen_parameters() -> None:
    model = _model()
    blocks.apply_freeze(model, train_blocks=0)
    optimizer = optim.create_optimizer(model, Recipe())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_set_lr_scales_every_group() -> None:
    model = _model()
    optimizer = optim.create_optimizer(model, Recipe(head_lr_ratio=4.0, layer_decay=0.5))
    optim.set_lr(optimizer, 1e-2)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-2 * group["lr_scale"])


def test_optimizer_step_moves_only_trainable_parameters() -> None:
    model = _model()
    blocks.apply_freeze(model, train_blocks=1)
    optimizer = optim.create_optimizer(model, Recipe(optimizer="sgd", lr=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert blocks.head_parameter_names(model) <= moved
    assert moved <= trainable


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_the_fused_update_is_the_default_one(opt: str) -> None:
    """The CPU has fused kernels for these three (a loop over parameters otherwise); they update alike."""
    recipe = Recipe(optimizer=opt, lr=0.05, head_lr_ratio=2.0, layer_decay=0.5, weight_decay=0.01)
    models_ = [_model() for _ in range(2)]
    models_[1].load_state_dict(models_[0].state_dict())
    fused = optim.create_optimizer(models_[0], recipe)
    assert fused.defaults["fused"] is True
    looped = optim.create_optimizer_v2(optim.param_groups(models_[1], recipe), opt=opt, lr=0.05, weight_decay=0.01)
    optim.set_lr(looped, recipe.lr)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model, optimizer in zip(models_, (fused, looped), strict=True):  # one step: later ones amplify rounding
        model(images).square().mean().backward()  # (Adam's normalized steps on near-zero gradients)
        optimizer.step()
    for (name, a), b in zip(models_[0].named_parameters(), models_[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_without_a_fused_kernel_the_default_optimizer_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    def create(groups, *, fused: bool = False, **options):
        made.append(fused)
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return torch.optim.AdamW(groups, lr=options["lr"])

    monkeypatch.setattr(optim, "create_optimizer_v2", create)
    assert isinstance(optim.create_optimizer(_model(), Recipe(optimizer="adamw")), torch.optim.AdamW)
    assert made == [True, False]
