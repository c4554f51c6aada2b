"""Weights from a file for a timm model: ``.safetensors`` or a torch state dict (read with ``weights_only=True``:
never arbitrary objects), matched to the model by name, or by order with every shape checked when the key names
differ (the demo's EfficientNet-Lite0 package); the classifier is loaded only when it fits the data's classes.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from autoft.blocks import classifier as _classifier
from autoft.blocks import model_name
from autoft.errors import AutoftError, brief

__all__ = ["load_weights"]

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_BN_COUNTER = "num_batches_tracked"


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``model``'s backbone; the classifier keeps its new shape.

    Keys are matched by name first; when the names differ (weights from another codebase)
    they are matched by order, with every backbone shape checked (only for ``.pth``-style files:
    safetensors sorts its keys, so its names must match). File classifier tensors
    whose shapes do not fit the model's head are dropped, so the head stays freshly initialized.
    Pickled ``.pth`` files are read with ``weights_only=True``: only tensors, never arbitrary objects.

    Example:
        >>> import tempfile, safetensors.torch
        >>> from autoft.tasks.image.models import create
        >>> source = create("test_resnet", num_classes=5, pretrained=False)
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> safetensors.torch.save_file(source.state_dict(), path)
        >>> target = create("test_resnet", num_classes=3, pretrained=False)
        >>> load_weights(target, path)
        >>> torch.equal(target.conv1[0].weight, source.conv1[0].weight)
        True
    """
    path = Path(path)
    tensors = _read_tensors(path)
    target = model.state_dict()
    head = _head_state_keys(model, target)
    backbone = [k for k in target if k not in head]

    picked, how = _match_by_name(tensors, target, backbone, head)
    if picked is None:
        if path.suffix.lower() in _SAFETENSORS_SUFFIXES:
            order_problem = "not tried: safetensors files sort their keys, so names must match"
        else:
            picked, order_problem = _match_by_order(tensors, target, backbone, head)
        if picked is None:
            raise AutoftError(
                f"Weights file {path} does not fit model {model_name(model)}: "
                f"by name {how}; by order, {order_problem}. "
                "Pass weights saved from the same architecture."
            )
        how = "by order (key names differ)"

    model.load_state_dict(picked, strict=False)
    head_loaded = any(k in picked for k in head)
    logger.info(
        "Loaded %d tensors from %s into %s, matched %s; classifier %s.",
        len(picked),
        path,
        model_name(model),
        how,
        "loaded from the file" if head_loaded else "left freshly initialized",
    )


def _head_state_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> set[str]:
    """State-dict keys (parameters and buffers) of the classifier module."""
    classifier = _classifier(model)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is classifier and n), None)
    if prefix is None:
        return set()
    return {k for k in state if k.startswith(prefix)}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in file order, unwrapped from common containers, ``module.`` stripped."""
    suffix = path.suffix.lower()
    if suffix not in _TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES:
        raise AutoftError(
            f"Weights file {path} has an unsupported suffix '{path.suffix}'; "
            f"use one of {', '.join(_SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES)}."
        )
    if not path.is_file():
        raise AutoftError(f"Weights file {path} does not exist; check the --weights path.")
    try:
        if suffix in _SAFETENSORS_SUFFIXES:
            loaded: Any = safetensors.torch.load_file(path, device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "Unsupported global" in detail:
            raise AutoftError(
                f"Weights file {path} holds pickled objects other than tensors, which are not loaded "
                f"for safety ({detail}); save it as a plain state_dict or as .safetensors."
            ) from err
        raise AutoftError(
            f"Weights file {path} could not be read ({detail}); check that it is a complete PyTorch file."
        ) from err
    except (OSError, RuntimeError, ValueError, EOFError, safetensors.SafetensorError) as err:
        raise AutoftError(
            f"Weights file {path} could not be read ({brief(err)}); check that it is a complete "
            "PyTorch or safetensors file."
        ) from err

    while isinstance(loaded, Mapping):
        inner = next((loaded[k] for k in _CONTAINER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    tensors = (
        {_strip_prefixes(str(k)): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if isinstance(loaded, Mapping)
        else {}
    )
    if not tensors:
        raise AutoftError(
            f"Weights file {path} contains no named tensors (found {type(loaded).__name__}); "
            "save model.state_dict() rather than the model object."
        )
    return tensors


def _unpickler_detail(err: pickle.UnpicklingError) -> str:
    """The one informative line of torch's long ``weights_only`` error."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split("\n", 1)[0].split(". ", 1)[0]
    return brief(text)


def _strip_prefixes(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _match_by_name(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    backbone: list[str],
    head: set[str],
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Pick the file's tensors by key name; (None, why not) unless every backbone key fits."""
    missing = [k for k in backbone if k not in tensors and not k.endswith(_BN_COUNTER)]
    misfit = [k for k in backbone if k in tensors and _shape(tensors[k]) != _shape(target[k])]
    if missing:
        return None, f"{len(missing)} keys missing (e.g. '{missing[0]}')"
    if misfit:
        k = misfit[0]
        return None, (
            f"{len(misfit)} keys differ in shape (e.g. '{k}' is {_shape(tensors[k])} "
            f"but the model needs {_shape(target[k])})"
        )
    picked = {k: tensors[k] for k in backbone if k in tensors}
    picked.update(_fitting_head(tensors, target, head, list(head)))
    unused = [k for k in tensors if k not in target]
    if unused:
        logger.info(
            "%d tensors in the weights file have no counterpart in the model (e.g. '%s').",
            len(unused),
            unused[0],
        )
    return picked, "by name"


def _match_by_order(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    backbone: list[str],
    head: set[str],
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Pair the file's tensors with the model's backbone keys position by position, shapes checked.

    The file's trailing tensors after the backbone are its classifier: kept when they fit the
    head, dropped otherwise. BatchNorm counters are paired too when the file has them.
    """
    file_keys = list(tensors)
    if not any(k.endswith(_BN_COUNTER) for k in file_keys):
        backbone = [k for k in backbone if not k.endswith(_BN_COUNTER)]
    head_keys = [k for k in target if k in head]
    for i, (file_key, model_key) in enumerate(zip(file_keys, backbone, strict=False)):
        if _shape(tensors[file_key]) != _shape(target[model_key]):
            return None, (
                f"tensor {i} '{file_key}' has shape {_shape(tensors[file_key])} "
                f"but the model's '{model_key}' needs {_shape(target[model_key])}"
            )
    extra = len(file_keys) - len(backbone)
    most = max(len(head_keys), 2)
    if extra < 0 or extra > most:
        return None, (
            f"the file has {len(file_keys)} tensors but the model's backbone needs {len(backbone)} "
            f"(plus at most {most} classifier tensors)"
        )
    picked = {m: tensors[f] for f, m in zip(file_keys, backbone, strict=False)}
    trailing = {m: tensors[f] for f, m in zip(file_keys[len(backbone) :], head_keys, strict=False)}
    if len(trailing) == len(head_keys) == extra:
        picked.update(_fitting_head(trailing, target, head, head_keys))
    return picked, ""


def _fitting_head(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    head: set[str],
    head_keys: list[str],
) -> dict[str, torch.Tensor]:
    """The file's head tensors, only when all of them fit the model's head (else the head stays new)."""
    if not head or not all(k in tensors and _shape(tensors[k]) == _shape(target[k]) for k in head_keys):
        return {}
    return {k: tensors[k] for k in head_keys}
