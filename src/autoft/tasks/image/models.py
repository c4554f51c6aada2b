"""timm models for the image task: create one by name, load weights from a file, its preprocessing.

Everything here goes through timm's own machinery (``create_model``, ``group_matcher``,
``get_classifier``, ``resolve_model_data_config``), so there is no per-architecture code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import timm
import timm.data
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from autoft.errors import AutoftError, brief, closest
from autoft.tasks.image.weights import load_weights

__all__ = ["check_name", "create", "data_config", "load_weights"]

logger = logging.getLogger(__name__)


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
                f"Model folder {brief(name)!r} could not be loaded ({brief(err)}); {_FOLDER_HINT}"
            ) from err
        if not uses_hub or not isinstance(err, OSError):
            raise
        cause = brief(err) if reachable else f"the Hugging Face Hub ({_hub_host()}) cannot be reached"
        raise AutoftError(  # no network, or the weights are not in the cache
            f"Pretrained weights could not be fetched for model {brief(name)!r} ({cause}); pass a local file with "
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
    raise AutoftError(f"Unknown model {brief(name)!r}.{hint} (see timm.list_models(), or give a model folder)")


def _check_model_folder(name: str, folder: Path) -> None:
    """A timm model folder: ``config.json`` naming a timm architecture (its weights are checked when loaded)."""
    config = folder / "config.json"
    try:
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise AutoftError(
                f"Model {brief(name)!r} is not a timm model name, and as a model folder it {what}; give a timm name "
                f"such as resnet50 (see timm.list_models()) or a folder: {_FOLDER_HINT}"
            )
        architecture = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError) as err:
        raise AutoftError(
            f"Model folder {brief(str(folder))!r} has no readable config.json ({brief(err)}); {_FOLDER_HINT}"
        ) from err
    if not isinstance(architecture, str) or not timm.is_model(split_model_name_tag(architecture)[0]):
        raise AutoftError(
            f"Model folder {brief(str(folder))!r}: config.json names architecture {brief(repr(architecture))}, "
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
