"""The model protocol's parts that fine-tuning moves: block groups, the head, freezing and the train mode.

Every task's model follows the protocol (``get_classifier``, optional ``group_matcher``; see
:mod:`autoft.tasks.base`), so freezing, layer-wise decay and the caches need no per-task code.
"""

from __future__ import annotations

import torch
from timm.models import group_parameters
from torch import nn

from autoft.errors import AutoftError

__all__ = [
    "apply_freeze",
    "block_groups",
    "classifier",
    "count_parameters",
    "head_parameter_names",
    "model_name",
    "set_train_mode",
]


def block_groups(model: nn.Module) -> list[list[str]]:
    """The backbone's coarse parameter groups in forward order (stem first), classifier excluded.

    Groups come from the model's ``group_matcher(coarse=True)``; models without one are grouped
    by their top-level children.

    Example:
        >>> from autoft.tasks.image.models import create
        >>> groups = block_groups(create("test_resnet", num_classes=2, pretrained=False))
        >>> groups[0][0], groups[-1][0]
        ('conv1.0.weight', 'layer4.0.conv1.weight')
    """
    head = head_parameter_names(model)
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        grouped = group_parameters(model, matcher(coarse=True))
        raw = [grouped[k] for k in sorted(grouped)]
    else:
        by_child: dict[str, list[str]] = {}
        for name, _ in model.named_parameters():
            by_child.setdefault(name.split(".", 1)[0], []).append(name)
        raw = list(by_child.values())
    groups = [[n for n in names if n not in head] for names in raw]
    return [g for g in groups if g]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (``model.get_classifier()``), as in ``named_parameters``.

    Example:
        >>> from autoft.tasks.image.models import create
        >>> sorted(head_parameter_names(create("test_resnet", num_classes=2, pretrained=False)))
        ['fc.bias', 'fc.weight']
    """
    head_ids = {id(p) for p in classifier(model).parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def apply_freeze(model: nn.Module, *, train_blocks: int | None) -> None:
    """Set ``requires_grad``: the head always trains, plus the last ``train_blocks`` block groups.

    ``None`` trains everything (full fine-tuning), ``0`` only the head (linear probe); a count
    larger than the number of groups trains everything. The count is per model, clipped rather than scaled: in a
    search over several models the same ``train_blocks`` trains the last k groups (those nearest the head) of
    each, a different share of each (resnet50 has 5 groups, efficientnet_b0 8, convnext_tiny 6).

    Example:
        >>> from autoft.tasks.image.models import create
        >>> model = create("test_resnet", num_classes=2, pretrained=False)
        >>> apply_freeze(model, train_blocks=0)
        >>> count_parameters(model, trainable_only=True)
        194
    """
    if train_blocks is not None and train_blocks < 0:
        raise AutoftError(f"train_blocks must be None or >= 0, but got {train_blocks}; use 0 for a linear probe.")
    for p in model.parameters():
        p.requires_grad_(True)
    if train_blocks is None:
        return
    groups = block_groups(model)
    frozen = {n for g in groups[: max(len(groups) - train_blocks, 0)] for n in g}
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, *, freeze_bn_stats: bool) -> None:
    """Put ``model`` in train mode, except parts that must stay fixed.

    Every module whose parameters are all frozen goes to eval (its BatchNorm statistics and
    dropout stay fixed, so frozen features stay frozen); with ``freeze_bn_stats`` every
    normalization layer with running statistics goes to eval as well.

    Example:
        >>> from autoft.tasks.image.models import create
        >>> model = create("test_resnet", num_classes=2, pretrained=False)
        >>> apply_freeze(model, train_blocks=0)
        >>> set_train_mode(model, freeze_bn_stats=False)
        >>> model.training, model.bn1.training, model.fc.training
        (True, False, True)
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        all_frozen = bool(params) and not any(p.requires_grad for p in params)
        if all_frozen or (freeze_bn_stats and _has_running_stats(module)):
            module.eval()


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements, optionally only those with ``requires_grad``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def classifier(model: nn.Module) -> nn.Module:
    """The model's head (``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        raise AutoftError(
            f"Model {model_name(model)} has no get_classifier(); a task's models must follow the model protocol."
        )
    return get()


def model_name(model: nn.Module) -> str:
    """The model's architecture name (timm's ``pretrained_cfg``), or its class name, for messages."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor)
