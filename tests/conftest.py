"""Shared test helpers: tiny generated image folders."""

from __future__ import annotations

import os

# Every Ray cluster the tests start (in-process ones included) is a throwaway on localhost, without token
# authentication (docs/cluster.md covers tokens): one in token mode broke the next one started in the process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One distinct base colour per class index, so tests can tell from pixels which class an image is.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 220, 40),
    (40, 40, 220),
    (220, 220, 40),
    (40, 220, 220),
    (220, 40, 220),
)


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "fish"),
    per_class: int = 10,
    size: tuple[int, int] = (20, 24),
    layout: str = "split",
    *,
    with_test: bool = False,
    noise: int = 20,
) -> Path:
    """Write a tiny PNG image folder under ``root`` and return ``root``.

    ``layout="split"``: ``root/train/<class>/`` with ``per_class`` images and ``root/val/<class>/`` with
    ``max(1, per_class // 4)``. ``layout="flat"``: ``root/<class>/`` with ``per_class`` images.
    ``size`` is (width, height). The ``i``-th class (in the order given) is ``CLASS_COLORS[i]`` plus
    a little noise (``noise``: its amplitude; large values make classes hard to tell apart), deterministic.
    ``with_test`` adds ``root/test/<class>/`` (split layout) with as many images as val.
    """
    root = Path(root)
    if layout == "split":
        parts = {"train": per_class, "val": max(1, per_class // 4)}
        if with_test:
            parts["test"] = parts["val"]
    elif layout == "flat":
        parts = {"": per_class}
    else:
        raise ValueError(f"layout must be 'split' or 'flat', got {layout!r}")
    rng = np.random.default_rng(0)
    for part, count in parts.items():
        for ci, name in enumerate(classes):
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(CLASS_COLORS[ci % len(CLASS_COLORS)], dtype=np.int16)
            for k in range(count):
                jitter = rng.integers(-noise, noise + 1, size=(size[1], size[0], 3))
                pixels = np.clip(base + jitter, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{k:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def _image_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """The decoded-image cache is on by default (beside the run dir); every test's cache goes to a temporary folder
    instead, so no test writes one into the repository (a test of the default location unsets the variable)."""
    from autoft.config import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("image-cache")))
        yield


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A split-layout folder (train/ + val/) with 3 classes of 10 + 2 images each."""
    return make_image_folder(tmp_path / "data")


def image_setup(model, dataset, *, device=None, feature_cache=None, prefix_cache=None, compile=False):
    """A :class:`~autoft.preparation.Setup` of the image task for a model and data built by hand in a test.

    ``feature_cache`` / ``prefix_cache``: a cache to use, or the string "build" for a fresh one of this model.
    """
    import torch

    from autoft import tasks
    from autoft.features import FeatureCache
    from autoft.prefix import PrefixCache
    from autoft.preparation import Setup
    from autoft.tasks.image import ImageSpec
    from autoft.tasks.image.models import data_config

    device = device or torch.device("cpu")
    cfg = data_config(model)
    spec = ImageSpec(dataset.image_size, tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg["interpolation"]))
    task = tasks.get("image")
    if feature_cache == "build":
        feature_cache = FeatureCache(model, dataset, task, spec, device=device)
    if prefix_cache == "build":
        prefix_cache = PrefixCache(model, dataset, task, spec, device=device)
    return Setup(task, model, dataset, spec, device, feature_cache, prefix_cache, compile)


def colour_split(per_class: int, *, seed: int, size: int = 16, noise: int = 40):
    """Three classes of solid colours (class i = ``CLASS_COLORS[i]``) plus uniform noise, as an image split."""
    import torch

    from autoft.tasks.image import data

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    colours = torch.tensor(CLASS_COLORS[:3])[labels][:, :, None, None]
    jitter = torch.randint(-noise, noise + 1, (len(labels), 3, size, size), generator=gen)
    return data.ImageSet((colours + jitter).clamp(0, 255).to(torch.uint8), labels)
