"""timm models for the image task: create one by name, load weights from a file, its preprocessing.

Everything here goes through timm's own machinery (``create_model``, ``group_matcher``,
``get_classifier``, ``resolve_model_data_config``), so there is no per-architecture code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import safetensors
import safetensors.torch
import timm
import timm.data
import torch
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from autoft.blocks import classifier as _classifier
from autoft.errors import AutoftError, closest

__all__ = ["check_name", "create", "data_config", "load_weights"]

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_BN_COUNTER = "num_batches_tracked"


def create(name: str, *, num_classes: int, pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """Create the timm model ``name`` with a fresh ``num_classes``-way head.

    ``name`` is a timm model name (``resnet50``, ``resnet50.a1_in1k``), ``hf-hub:ORG/REPO``, or a local model
    folder as timm writes it (``timm.models.save_for_hf``: ``config.json`` plus weights), given as a path or as
    ``local-dir:PATH``; the folder's weights are its pretrained weights. With ``weights``, the backbone comes from
    that file instead (see `load_weights`). When the Hugging Face Hub cannot be reached, the weights come from the
    local cache or the error says so within seconds (no minute of retries).

    Example:
        >>> model = create("test_resnet", num_classes=10, pretrained=False)
        >>> model.get_classifier().out_features
        10
    """
    timm_name = _timm_name(name)
    source = parse_model_name(timm_name)[0]
    load_pretrained = pretrained and weights is None
    uses_hub = source == "hf-hub" or (load_pretrained and source is None)  # a folder's weights are local
    reachable = not uses_hub or _hub_reachable()
    try:
        with _hub_offline(not reachable):
            model = timm.create_model(timm_name, pretrained=load_pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        if source == "local-dir":  # a folder whose config or weights do not fit
            raise AutoftError(
                f"Model folder {_brief(name)!r} could not be loaded ({_brief(err)}); {_FOLDER_HINT}"
            ) from err
        if not uses_hub or not isinstance(err, OSError):
            raise
        cause = _brief(err) if reachable else f"the Hugging Face Hub ({_hub_host()}) cannot be reached"
        raise AutoftError(  # no network, or the weights are not in the cache
            f"Pretrained weights could not be fetched for model {_brief(name)!r} ({cause}); pass a local file with "
            "--weights FILE or a local model folder with --model PATH, set HF_HUB_OFFLINE=1 with the weights "
            "already in the Hugging Face cache, or train from scratch with --no-pretrained."
        ) from err
    if weights is not None:
        load_weights(model, weights)
    return model


def check_name(name: str) -> None:
    """Raise an AutoftError naming the closest timm models when ``name`` is not one (nothing is loaded).

    A path (or ``local-dir:PATH``) must be a timm model folder; ``hf-hub:`` names are checked when loaded.

    Example:
        >>> check_name("test_resnet")
    """
    _timm_name(name)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``model``'s backbone; the classifier keeps its new shape.

    Keys are matched by name first; when the names differ (weights from another codebase)
    they are matched by order, with every backbone shape checked (only for ``.pth``-style files:
    safetensors sorts its keys, so its names must match). File classifier tensors
    whose shapes do not fit the model's head are dropped, so the head stays freshly initialized.
    Pickled ``.pth`` files are read with ``weights_only=True``: only tensors, never arbitrary objects.

    Example:
        >>> import tempfile, safetensors.torch
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
                f"Weights file {path} does not fit model {_model_name(model)}: "
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
        _model_name(model),
        how,
        "loaded from the file" if head_loaded else "left freshly initialized",
    )


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's expected input: size, mean, std, interpolation and crop, from timm.

    Example:
        >>> data_config(create("test_resnet", num_classes=2, pretrained=False))["input_size"]
        (3, 160, 160)
    """
    return dict(timm.data.resolve_model_data_config(model))


# ---------------------------------------------------------------------------------------------
# helpers


_FOLDER_HINT = (
    "a model folder needs timm's config.json (with 'architecture') and a weights file, as "
    "timm.models.save_for_hf writes them."
)
_HUB_PROBE_SECONDS = 3.0


def _timm_name(name: str) -> str:
    """The name to give timm: a timm name as it is, a model folder as ``local-dir:PATH``; else one clear error."""
    if not isinstance(name, str) or not name.strip():
        raise AutoftError(f"--model must be a timm model name such as resnet50 or a model folder, but got {name!r}.")
    try:
        source, model_id = parse_model_name(name)
    except ValueError:  # a path, or an unknown "source:" prefix
        source, model_id = None, None
    if source == "hf-hub":  # resolved (and, if unreachable, reported) by timm when the model is created
        return name
    if source == "local-dir" or model_id is None:
        folder = Path(model_id if source == "local-dir" else name).expanduser()
        _check_model_folder(name, folder)
        return f"local-dir:{folder}"
    architecture, _ = split_model_name_tag(model_id)
    if timm.is_model(architecture):
        return name
    matches = closest(architecture, timm.list_models())
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise AutoftError(f"Unknown model {_brief(name)!r}.{hint} (see timm.list_models(), or give a model folder)")


def _check_model_folder(name: str, folder: Path) -> None:
    """A timm model folder: ``config.json`` naming a timm architecture (its weights are checked when loaded)."""
    config = folder / "config.json"
    try:
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise AutoftError(
                f"Model {_brief(name)!r} is not a timm model name, and as a model folder it {what}; give a timm name "
                f"such as resnet50 (see timm.list_models()) or a folder: {_FOLDER_HINT}"
            )
        architecture = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError) as err:
        raise AutoftError(
            f"Model folder {_brief(str(folder))!r} has no readable config.json ({_brief(err)}); {_FOLDER_HINT}"
        ) from err
    if not isinstance(architecture, str) or not timm.is_model(split_model_name_tag(architecture)[0]):
        raise AutoftError(
            f"Model folder {_brief(str(folder))!r}: config.json names architecture {_brief(repr(architecture))}, "
            f"which is not a timm model; {_FOLDER_HINT}"
        )


def _hub_host() -> str:
    return urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"


def _hub_reachable() -> bool:
    """Whether a TCP connection to the Hub opens within a few seconds (True when offline mode or a proxy is set).

    Without it, huggingface_hub retries an unreachable Hub for about a minute before failing.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True
    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    answer: list[bool] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout=_HUB_PROBE_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(_HUB_PROBE_SECONDS + 1.0)
    return bool(answer and answer[0])


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Hub offline mode for one call: cached weights still load, missing ones fail at once."""
    if not offline:
        yield
        return
    was = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = was


def _brief(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


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
            f"Weights file {path} could not be read ({_brief(err)}); check that it is a complete "
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
    return _brief(text)


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
