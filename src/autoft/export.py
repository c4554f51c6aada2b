"""The tuned model on disk (``best/``): weights in safetensors plus ``config.json``, and loading it back.

Files are written to a temporary name and renamed into place, so a crash never leaves a half-written
file; the weights carry the trial number in their metadata and loading checks it against the config.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autoft import tasks
from autoft.errors import AutoftError
from autoft.features import autocast
from autoft.tasks.base import Deployable, LoadedModel
from autoft.tasks.image import data, transforms
from autoft.trial import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "Evaluation",
    "Prediction",
    "TunedModel",
    "evaluate_folder",
    "export_model",
    "load_model",
    "predict_files",
    "save_model",
    "update_config",
]

WEIGHTS, CONFIG, ADAPTER = "model.safetensors", "config.json", "adapter.safetensors"
EXPORT_FORMATS = ("onnx", "torchscript")
_ONNX_SINGLE_FILE_BYTES = 1 << 30  # weights above this go to an external-data file (protobuf caps a file at 2 GiB)


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # the mode a new file gets here (0644 under 022): safetensors writes 0600
    os.replace(tmp, path)


def _umask() -> int:
    """The process's umask (reading it means setting it: set to 022 and back at once, never to 0)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model(
    directory: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    adapter: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
) -> Path:
    """Write ``state`` and ``meta`` (model name, classes, preprocessing, params, scores) into ``directory``.

    ``adapter``: (tensors, metadata) of the trained parameters alone, written as ``adapter.safetensors``
    (``--export-adapter``); without one, an adapter file left by an earlier model is removed.

    >>> save_model(Path("runs/x/best"), model.state_dict(), {"model": "resnet50", ...})  # doctest: +SKIP
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    stamp = {"trial": str(meta.get("trial"))}
    _replace_atomically(directory / WEIGHTS, lambda p: save_file(tensors, str(p), metadata=stamp))
    _replace_atomically(directory / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    if adapter is None:
        (directory / ADAPTER).unlink(missing_ok=True)
    else:
        small = {k: v.detach().cpu().contiguous() for k, v in adapter[0].items()}
        _replace_atomically(directory / ADAPTER, lambda p: save_file(small, str(p), metadata=adapter[1] | stamp))
    return directory


def update_config(directory: Path, **fields: Any) -> dict[str, Any]:
    """Add fields (e.g. the test accuracy) to an exported model's ``config.json``."""
    meta = json.loads((directory / CONFIG).read_text()) | fields
    _replace_atomically(directory / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


@dataclass
class TunedModel(LoadedModel):
    """A fine-tuned image model with its preprocessing: give it images, get class names back.

    >>> tuned = load_model("runs/demo/best")  # doctest: +SKIP
    >>> tuned.predict(["cat.jpg", "dog.jpg"])  # doctest: +SKIP
    ['cat', 'dog']
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    def _as_batch(self, images: torch.Tensor | Sequence[str | Path]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack(
            [data.load_image(p, image_size=self.image_size, interpolation=self.interpolation) for p in images]
        )

    def predict_proba(self, images: torch.Tensor | Sequence[str | Path]) -> torch.Tensor:
        """Class probabilities (N, classes) for image files or a uint8 batch (N, 3, S, S)."""
        return self.logits(self._as_batch(images)).softmax(1)

    def predict(self, images: torch.Tensor | Sequence[str | Path]) -> list[str]:
        """The most likely class name for each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(1).tolist()]

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Raw class scores (N, classes), float32 on the CPU, for a uint8 batch (N, 3, S, S) of any size."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(self.device, non_blocking=True)
            with autocast(self.device):
                out.append(self.model(transforms.normalize(chunk, mean=self.mean, std=self.std)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def deployable(self, examples: Sequence[str | Path] | None = None) -> Deployable:
        """Float pixel values 0-255 in (normalization built in), logits out, any batch size; checked on the images
        ``examples`` names (files, folders, patterns; None: a batch of 3 random images, not the traced 4)."""
        generator = torch.Generator().manual_seed(0)
        size = self.image_size
        example = torch.randint(0, 256, (4, 3, size, size), generator=generator).float()
        if examples:
            odd_batch = self._as_batch(data.find_images(examples))
        else:
            odd_batch = torch.randint(0, 256, (3, 3, size, size), generator=generator).to(torch.uint8)
        meta = {k: self.meta[k] for k in ("model", "classes", "image_size", "interpolation") if k in self.meta}
        meta["input"] = "float32 (N, 3, S, S) RGB pixel values 0-255; normalization is built in"
        return Deployable(
            module=_Deployable(self.model, self.mean, self.std).eval(),
            example={"images": example},
            dynamic={"images": {0: torch.export.Dim("batch", min=1)}},
            check={"images": odd_batch.float()},
            expected=self.logits(odd_batch),
            meta=meta,
        )


def load_model(path: str | Path, *, device: str = "auto") -> TunedModel:
    """Load an exported model (a ``best/`` folder) ready to predict, as its task (``config.json``) loads it.

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
    task = tasks.get(meta.get("task", "image"))  # models exported before tasks existed are images
    return task.load_tuned(directory, meta, state, resolve_device(device))


# ----------------------------------------------------------------------------- using the tuned model


@dataclass(frozen=True)
class Prediction:
    """The ``top_k`` most likely classes of one image, best first, with their probabilities."""

    path: Path
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]


def _batched_proba(
    tuned: TunedModel, files: Sequence[Path], *, batch_size: int, progress: Callable[[int], None] | None
) -> torch.Tensor:
    """Probabilities for ``files``, decoded ``batch_size`` at a time (memory stays flat for any number of files)."""
    chunks = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        chunks.append(tuned.predict_proba(batch))
        if progress is not None:
            progress(len(batch))
    return torch.cat(chunks) if chunks else torch.zeros(0, len(tuned.classes))


def predict_files(
    tuned: TunedModel,
    files: Sequence[Path],
    *,
    top_k: int = 3,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Top-``k`` classes with probabilities for each image file; ``progress(n)`` after every batch of ``n``.

    >>> predict_files(load_model("runs/demo/best"), [Path("cat.jpg")], top_k=2)[0].classes  # doctest: +SKIP
    ('cat', 'dog')
    """
    if top_k < 1:
        raise AutoftError(f"--top-k must be at least 1, but got {top_k}.")
    proba = _batched_proba(tuned, files, batch_size=batch_size, progress=progress)
    values, indices = proba.topk(min(top_k, len(tuned.classes)), dim=1)
    return [
        Prediction(path, tuple(tuned.classes[i] for i in idx), tuple(round(v, 6) for v in vals))
        for path, vals, idx in zip(files, values.tolist(), indices.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class, columns: predicted) of one split."""

    classes: tuple[str, ...]
    accuracy: float
    per_class: dict[str, float | None]  # None: the split has no image of that class
    confusion: list[list[int]]
    count: int

    @classmethod
    def from_predictions(cls, labels: torch.Tensor, predicted: torch.Tensor, classes: Sequence[str]) -> Evaluation:
        """Score predicted class indices against true ones.

        >>> Evaluation.from_predictions(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b"]).confusion
        [[1, 0], [1, 1]]
        """
        n = len(classes)
        confusion = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
        per_class = {
            name: (confusion[i, i].item() / int(confusion[i].sum())) if confusion[i].sum() > 0 else None
            for i, name in enumerate(classes)
        }
        correct = int(confusion.diagonal().sum())
        return cls(
            classes=tuple(classes),
            accuracy=correct / max(1, len(labels)),
            per_class=per_class,
            confusion=confusion.tolist(),
            count=len(labels),
        )


def evaluate_folder(
    tuned: TunedModel, folder: str | Path, *, batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> Evaluation:
    """Score the model on a folder of class sub-folders (e.g. ``data/test``) whose names are the model's classes.

    >>> evaluate_folder(load_model("runs/demo/best"), "data/test").accuracy  # doctest: +SKIP
    0.97
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AutoftError(f"{folder} is not a folder; give a folder of class sub-folders such as data/test.")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in class_dirs if p.name not in tuned.classes]
    if unknown or not class_dirs:
        raise AutoftError(
            f"{folder} must hold one sub-folder per class the model knows ({', '.join(tuned.classes)}), "
            f"but has {', '.join(unknown) if unknown else 'none'}."
        )
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        found = data.find_images([class_dir]) if any(class_dir.iterdir()) else []
        files += found
        labels += [tuned.classes.index(class_dir.name)] * len(found)
    if not files:
        raise AutoftError(f"{folder} has class folders but no image files in them.")
    proba = _batched_proba(tuned, files, batch_size=batch_size, progress=progress)
    return Evaluation.from_predictions(torch.tensor(labels), proba.argmax(1), tuned.classes)


class _Deployable(nn.Module):
    """The model with its normalization built in: input float (N, 3, S, S) pixel values 0-255, output logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _write_onnx(deployable: Deployable, path: Path) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    import onnx
    import onnxruntime

    module = deployable.module
    # One self-contained file; past protobuf's 2 GiB limit the weights go to PATH.data beside it (referenced).
    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > _ONNX_SINGLE_FILE_BYTES
    sidecar = path.with_name(path.name + ".data")
    sidecar.unlink(missing_ok=True)  # an earlier export's weights, never this file's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(deployable.example.values()),
            str(path),
            input_names=list(deployable.example),
            output_names=["logits"],
            dynamic_shapes=deployable.dynamic,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    proto = onnx.load(str(path), load_external_data=False)  # external tensors stay references to PATH.data
    onnx.helper.set_model_props(proto, {"autoft": json.dumps(deployable.meta)})
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def _write_torchscript(deployable: Deployable, path: Path) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still the portable file
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(deployable.module, tuple(deployable.example.values()))
        torch.jit.save(traced, str(path), _extra_files={CONFIG: json.dumps(deployable.meta)})
        loaded = torch.jit.load(str(path))
    return lambda inputs: loaded(*inputs.values()).detach()


_WRITERS = {"onnx": (".onnx", _write_onnx), "torchscript": (".pt", _write_torchscript)}


def export_model(
    path: str | Path,
    *,
    format: str,
    output: str | Path | None = None,
    tolerance: float = 1e-4,
    examples: Sequence[Any] | None = None,
) -> tuple[Path, float]:
    """Write a deployable file of an exported model and check it against PyTorch on a batch.

    Image models take float images ``(N, 3, S, S)`` with pixel values 0-255 (normalization is built in); text
    models take ``input_ids`` and ``attention_mask`` ``(N, T)`` int64 (and ``token_type_ids`` for sentence pairs);
    both return logits, and the classes and preprocessing travel in the file's metadata. Returns the file and the
    largest absolute difference between its logits and PyTorch's on ``examples`` (what ``autoft predict`` takes:
    image files or folders; sentences or files of them; None: the task's own check batch), above ``tolerance`` an
    error.

    >>> export_model("runs/demo/best", format="onnx")  # doctest: +SKIP
    (PosixPath('runs/demo/best/model.onnx'), 2.1e-06)
    """
    if format not in _WRITERS:
        raise AutoftError(f"Export format {format!r} is not known; choose one of: {', '.join(_WRITERS)}.")
    suffix, write = _WRITERS[format]
    tuned = load_model(path, device="cpu")
    target = Path(output) if output else Path(path) / f"model{suffix}"
    deployable = tuned.deployable(examples)
    try:
        run = write(deployable, target)
    except ImportError as exc:
        raise AutoftError(
            f"Exporting to {format} needs {exc.name}; install it with: pip install 'autoft[export]'."
        ) from None
    difference = (run(deployable.check) - deployable.expected).abs().max().item()
    scale = max(1.0, deployable.expected.abs().max().item())
    if not difference <= tolerance * scale:
        raise AutoftError(
            f"The {format} file {target} differs from the PyTorch model by up to {difference:.3g} "
            f"(tolerance {tolerance * scale:.3g}); the model may use an operation {format} does not support."
        )
    log.info("exported %s (max abs difference from PyTorch %.3g)", target, difference)
    return target, difference
