"""Shared test helpers: tiny generated image folders."""

from __future__ import annotations

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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A split-layout folder (train/ + val/) with 3 classes of 10 + 2 images each."""
    return make_image_folder(tmp_path / "data")
