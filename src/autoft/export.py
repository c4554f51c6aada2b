"""The tuned model on disk (``best/``): weights in safetensors plus ``config.json``, and loading it back.

Files are written to a temporary name and renamed into place, so a crash never leaves a half-written
file; the weights carry the trial number in their metadata and loading checks it against the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autoft import data, models
from autoft.errors import AutoftError
from autoft.trial import predict_logits, resolve_device

__all__ = ["TunedModel", "load_model", "save_model", "update_config"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _replace_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_model(directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state`` and ``meta`` (model name, classes, preprocessing, params, scores) into ``directory``.

    >>> save_model(Path("runs/x/best"), model.state_dict(), {"model": "resnet50", ...})  # doctest: +SKIP
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    stamp = {"trial": str(meta.get("trial"))}
    _replace_atomically(directory / WEIGHTS, lambda p: save_file(tensors, str(p), metadata=stamp))
    _replace_atomically(directory / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def update_config(directory: Path, **fields: Any) -> dict[str, Any]:
    """Add fields (e.g. the test accuracy) to an exported model's ``config.json``."""
    meta = json.loads((directory / CONFIG).read_text()) | fields
    _replace_atomically(directory / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


@dataclass
class TunedModel:
    """A fine-tuned model with its preprocessing: give it images, get class names back.

    >>> tuned = load_model("runs/demo/best")  # doctest: +SKIP
    >>> tuned.predict(["cat.jpg", "dog.jpg"])  # doctest: +SKIP
    ['cat', 'dog']
    """

    model: nn.Module
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    meta: dict[str, Any]
    device: torch.device

    def _as_batch(self, images: torch.Tensor | Sequence[str | Path]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack(
            [data.load_image(p, image_size=self.image_size, interpolation=self.interpolation) for p in images]
        )

    def predict_proba(self, images: torch.Tensor | Sequence[str | Path]) -> torch.Tensor:
        """Class probabilities (N, classes) for image files or a uint8 batch (N, 3, S, S)."""
        logits = predict_logits(self.model, self._as_batch(images), mean=self.mean, std=self.std, device=self.device)
        return logits.softmax(1).cpu()

    def predict(self, images: torch.Tensor | Sequence[str | Path]) -> list[str]:
        """The most likely class name for each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(1).tolist()]


def load_model(path: str | Path, *, device: str = "auto") -> TunedModel:
    """Load an exported model (a ``best/`` folder) ready to predict.

    >>> load_model("runs/demo/best").classes  # doctest: +SKIP
    ('0', '1', '2', ...)
    """
    directory = Path(path)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise AutoftError(
            f"{directory} is not an exported model: it needs {CONFIG} and {WEIGHTS} (a run's best/ folder)."
        )
    meta = json.loads((directory / CONFIG).read_text())
    try:
        state = load_file(str(directory / WEIGHTS))
        with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
            stamp = (handle.metadata() or {}).get("trial")
    except (SafetensorError, OSError) as exc:
        raise AutoftError(f"{directory / WEIGHTS} could not be read ({exc}); export the model again.") from None
    if stamp is not None and stamp != str(meta.get("trial")):
        raise AutoftError(
            f"{directory}: the weights are of trial {stamp} but {CONFIG} describes trial {meta.get('trial')} "
            "(interrupted while exporting?); run the search command again to re-export the best trial."
        )
    model = models.create(meta["model"], num_classes=len(meta["classes"]), pretrained=False)
    model.load_state_dict(state)
    torch_device = resolve_device(device)
    model.to(torch_device).eval()
    return TunedModel(
        model=model,
        classes=tuple(meta["classes"]),
        image_size=int(meta["image_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        interpolation=meta["interpolation"],
        meta=meta,
        device=torch_device,
    )
