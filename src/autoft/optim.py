"""Optimizers, parameter groups (head rate, layer-wise decay, no decay on biases/norms) and the schedule."""

from __future__ import annotations

import logging
import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from autoft import blocks, pieces
from autoft.recipe import Recipe

__all__ = ["create_optimizer", "lr_factor", "param_groups", "set_lr"]

log = logging.getLogger(__name__)

# torch's fused kernels update every parameter of a step in one pass; its default on the CPU is a loop over the
# parameters. Measured on 2 CPU cores (torch 2.14): one AdamW step over MiniLM-L6's 22.7 M parameters took 179 ms
# looped and 28 ms fused (a batch-8 training step was ~470 ms in all; Hugging Face's Trainer uses fused AdamW by
# default), over efficientnet_lite0's 86 ms and 23 ms; SGD with momentum on MiniLM 37 ms and 20 ms.
FUSED = ("adam", "adamw", "sgd")


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Trainable parameters grouped by (learning-rate scale, weight decay).

    Block group ``i`` of ``n`` gets ``layer_decay ** (n - i)`` (earlier layers move less, as in BEiT); the
    head gets ``head_lr_ratio``. Biases and norm weights (1-D tensors) get no weight decay. Only
    parameters with ``requires_grad`` are included, so frozen layers cost the optimizer nothing.

    >>> from autoft.tasks.image.models import create
    >>> groups = param_groups(create("test_resnet", num_classes=3, pretrained=False), Recipe())
    >>> sorted({g["lr_scale"] for g in groups})[-1]
    10.0
    """
    groups = blocks.block_groups(model)
    scale_of = {name: recipe.layer_decay ** (len(groups) - i) for i, group in enumerate(groups) for name in group}
    head = blocks.head_parameter_names(model)
    grouped: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = recipe.head_lr_ratio if name in head else scale_of.get(name, 1.0)
        decay = 0.0 if param.ndim <= 1 else recipe.weight_decay
        grouped.setdefault((scale, decay), []).append(param)
    return [{"params": ps, "lr_scale": s, "weight_decay": d} for (s, d), ps in grouped.items()]


def create_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the model's trainable parameters (timm's factory, or a registered piece)."""
    custom = pieces.get("optimizer", recipe.optimizer)
    if custom is not None:
        optimizer = custom.fn(param_groups(model, recipe), recipe)
        set_lr(optimizer, recipe.lr)
        return optimizer
    extra = {"momentum": recipe.momentum} if recipe.optimizer == "sgd" else {}
    groups = param_groups(model, recipe)
    options = dict(opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)
    optimizer = None
    if recipe.optimizer in FUSED:
        try:  # unsupported where a parameter's device has no fused kernel: the default then
            optimizer = create_optimizer_v2(groups, fused=True, **options)
        except (RuntimeError, ValueError, TypeError) as err:
            log.debug("fused %s not available (%s); the default implementation", recipe.optimizer, err)
    optimizer = optimizer or create_optimizer_v2(groups, **options)
    set_lr(optimizer, recipe.lr)
    return optimizer


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then cosine to zero or constant.

    >>> lr_factor(0, total_steps=100, warmup_steps=10, schedule="cosine")
    0.1
    >>> lr_factor(100, total_steps=100, warmup_steps=10, schedule="cosine")
    0.0
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times the group's own scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
