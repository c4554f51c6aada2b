"""Image classification: timm models, image folders decoded once, augmentation and mixing on uint8 batches.

The first task behind the seam (:mod:`autoft.tasks.base`). timm models already follow the model protocol;
``data`` reads and decodes image folders (``formats`` reads manifests, Parquet and CIFAR batches), ``models``
creates timm models and loads weights.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from autoft.tasks import base
from autoft.tasks.image import data, models, transforms

if TYPE_CHECKING:
    from autoft.config import SearchConfig
    from autoft.export import TunedModel
    from autoft.recipe import Recipe

__all__ = ["ImageSpec", "ImageTask"]


@dataclass(frozen=True)
class ImageSpec:
    """How stored uint8 images become a model's inputs: working resolution, normalization, resize filter."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


class ImageTask(base.Task):
    """Single-label image classification on image folders with any timm model."""

    name = "image"

    def check_model(self, name: str) -> None:
        models.check_name(name)

    def create_model(self, name: str, config: SearchConfig) -> nn.Module:
        return models.create(name, num_classes=1, pretrained=config.pretrained, weights=config.weights)

    def input_spec(self, model: nn.Module, config: SearchConfig) -> ImageSpec:
        preprocessing = models.data_config(model)
        return ImageSpec(
            image_size=config.image_size or int(preprocessing["input_size"][-1]),
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
            interpolation=str(preprocessing["interpolation"]),
        )

    def load_data(self, config: SearchConfig, spec: ImageSpec) -> base.Dataset:
        return data.load_images(
            config.data,
            image_size=spec.image_size,
            val_fraction=config.val_fraction,
            seed=config.seed,
            interpolation=spec.interpolation,
            cache_dir=config.cache_dir,
        )

    def batches(
        self, split: data.ImageSet, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[base.Batch]:
        return base.batches(split, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def merged(self, first: data.ImageSet, second: data.ImageSet) -> data.ImageSet:
        return data.merged(first, second)  # past the memory bound a mapped file, not both splits in memory

    def train_inputs(
        self,
        batch: base.Batch,
        recipe: Recipe,
        spec: ImageSpec,
        *,
        num_classes: int,
        device: torch.device,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A uint8 CPU batch -> inputs and targets on ``device``: copied, augmented there, normalized, mixed."""
        images, labels = batch
        if device.type == "cuda":  # page-locked, so the copy runs asynchronously (torch caches pinned blocks)
            images = images.pin_memory()
        images = transforms.augment(images.to(device, non_blocking=True), recipe.augment, generator=generator)
        inputs = self._normalized(images, spec)
        labels = labels.to(device, non_blocking=True)
        if recipe.mixup > 0 or recipe.cutmix > 0:  # soft targets: cross_entropy takes class probabilities
            return transforms.mix(
                inputs, labels, num_classes, mixup=recipe.mixup, cutmix=recipe.cutmix, generator=generator
            )
        return inputs, labels

    def eval_inputs(self, inputs: torch.Tensor, spec: ImageSpec, *, device: torch.device) -> torch.Tensor:
        return self._normalized(inputs.to(device, non_blocking=True), spec)

    @staticmethod
    def _normalized(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
        inputs = transforms.normalize(images, mean=spec.mean, std=spec.std)
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.is_cuda else inputs

    def deterministic(self, recipe: Recipe) -> bool:
        return recipe.augment == "none" and recipe.mixup == 0 and recipe.cutmix == 0

    def export_meta(self, spec: ImageSpec) -> dict[str, Any]:
        return {
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
        }

    def spec_from_meta(self, meta: dict[str, Any]) -> ImageSpec:
        return ImageSpec(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]), meta["interpolation"])

    def load_tuned(
        self, directory: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> TunedModel:
        from autoft.export import TunedModel  # the output layer's type; export imports no task module

        model = models.create(meta["model"], num_classes=len(meta["classes"]), pretrained=False)
        model.load_state_dict(state)
        model.to(device).eval()
        spec = self.spec_from_meta(meta)
        return TunedModel(model, tuple(meta["classes"]), meta, device, spec.image_size, spec.mean, spec.std,
                          spec.interpolation)  # fmt: skip

    def example_html(self, split: data.ImageSet, rows: list[int]) -> list[str]:
        return [f'<img src="{_png_data_uri(split.images[row])}" alt="image {html.escape(str(row))}">' for row in rows]


def _png_data_uri(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
