"""What every trial of a search shares, built once: each model with its new head, the data read once, caches.

The search core prepares through the task (:mod:`autoft.tasks`): it never knows whether the data are images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoft import features, prefix, tasks
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.features import FeatureCache
from autoft.prefix import PrefixCache
from autoft.tasks.base import Dataset, InputSpec, Task
from autoft.trial import resolve_device

__all__ = ["Setup", "prepare", "prepare_models"]


@dataclass
class Setup:
    """What every trial of one model shares: the pretrained model with its new head, the data read once for its
    input spec, the task that knows both, the device, and the caches built on first use."""

    task: Task
    base_model: nn.Module
    dataset: Dataset
    spec: InputSpec  # how stored examples become this model's inputs (image size, mean, std, ...)
    device: torch.device
    feature_cache: FeatureCache | None = None  # pooled features for head-only trials
    prefix_cache: PrefixCache | None = None  # activations after a frozen prefix, for partial fine-tuning
    compile: bool = False  # torch.compile each trial's training forward

    def export_meta(self) -> dict[str, Any]:
        """What an exported model of this setup records to be used again: the task, the classes, the input spec."""
        classes = list(self.dataset.classes)
        return {"task": self.task.name, "num_classes": len(classes), "classes": classes} | self.task.export_meta(
            self.spec
        )


def prepare(
    config: SearchConfig,
    *,
    model_name: str | None = None,
    loaded: dict[InputSpec, Dataset] | None = None,
    cache_share: float = 1.0,
) -> Setup:
    """Create the model (weights loaded once) and read the data once, for the model's input spec.

    ``model_name``: which of the config's models (default the first). ``loaded`` maps input specs to data
    already read for them, which is reused; data read here is added to it. ``cache_share``: this model's share
    of the caches' stated bounds (a search over k models gives each 1/k).

    >>> setup = prepare(SearchConfig(model="test_resnet", data=Path("data"), pretrained=False))  # doctest: +SKIP
    """
    if not config.data.exists():
        raise AutoftError(f"Data {config.data} does not exist; pass --data the folder or file of your examples.")
    task = tasks.get(config.task)
    torch.manual_seed(config.seed)  # from-scratch and new-head initialization depend on it
    model = task.create_model(model_name or config.models[0], config)
    spec = task.input_spec(model, config)
    loaded = {} if loaded is None else loaded
    if spec not in loaded:
        loaded[spec] = task.load_data(config, spec)
    dataset = loaded[spec]
    torch.manual_seed(config.seed)
    model.reset_classifier(len(dataset.classes))  # the head fits the data's classes; weights loaded once above
    device = resolve_device(config.device)
    return Setup(
        task=task,
        base_model=model,
        dataset=dataset,
        spec=spec,
        device=device,
        feature_cache=FeatureCache(
            model, dataset, task, spec, device=device, max_bytes=int(cache_share * features.DEFAULT_MAX_BYTES)
        ),
        prefix_cache=PrefixCache(
            model,
            dataset,
            task,
            spec,
            device=device,
            spill_dir=_spill_dir(config),
            max_memory_bytes=int(cache_share * prefix.DEFAULT_MAX_MEMORY_BYTES),
            max_disk_bytes=int(cache_share * prefix.DEFAULT_MAX_DISK_BYTES),
        ),
        compile=config.compile,
    )


def prepare_models(config: SearchConfig) -> dict[str, Setup]:
    """One :class:`Setup` per candidate model (``--model a,b``), in the order given; every name is checked first.

    Each model's weights load once; the data is read once per distinct input spec and shared by every model that
    needs it (the train/val split depends only on the seed); each model has its own caches, each with a 1/k share
    of their stated bounds, so k models together stay within them (a model that selection drops frees its
    share). Memory held: every candidate's weights (resnet50: 100 MB in fp32), one copy of the data per distinct
    spec (images: N x 3 x S x S bytes, 10,000 images at 224 px = 1.5 GB), and per model, once trials build them,
    its pooled features (N x D x 4 bytes) and prefix activations.

    >>> setups = prepare_models(SearchConfig(model="resnet50,convnext_tiny", data=Path("data")))  # doctest: +SKIP
    """
    task = tasks.get(config.task)
    for name in config.models:  # a typo in the last name fails before the first model loads
        task.check_model(name)
    loaded: dict[InputSpec, Dataset] = {}
    share = 1 / len(config.models)
    return {name: prepare(config, model_name=name, loaded=loaded, cache_share=share) for name in config.models}


def _spill_dir(config: SearchConfig) -> Path | None:
    """Where the prefix cache spills past its memory bound: the run directory, when the search has one."""
    return config.run_dir / "prefix_cache" if config.run_dir is not None else None
