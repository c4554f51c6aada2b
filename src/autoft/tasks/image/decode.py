"""Decoding images: one file, encoded bytes or pixels -> uint8 RGB at the working resolution (resize the shorter
side, center crop), and many at once in a thread pool (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoft.errors import AutoftError
from autoft.tasks.image import formats

__all__ = ["DECODE_ERRORS", "INTERPOLATIONS", "decode_all", "load_image"]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# Errors PIL raises for unreadable, truncated or absurd files; anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit and 32-bit grayscale to 8 bits (PIL's own convert clips them to white)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / (257.0 if top <= 65535.0 else top / 255.0)
    else:
        return img
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _open(item: formats.Item) -> Image.Image:
    """An image file, its encoded bytes, or uint8 pixels ``(H, W, 3)``, as a PIL image."""
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def _decode(item: formats.Item, size: int, resample: Image.Resampling) -> np.ndarray:
    """One image -> uint8 ``(S, S, 3)``: RGB, shorter side resized to ``size``, center-cropped."""
    with _open(item) as img:
        img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale that is still >= size
        img = _to_8bit(img)
        if img.mode == "P":  # via RGBA so palette transparency is handled without a PIL warning
            img = img.convert("RGBA")
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.resize((nw, nh), resample).crop((left, top, left + size, top + size))
        return np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy does not warn


def load_image(path: str | Path, *, image_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """One image file as the model sees it before normalization: uint8 ``(3, S, S)``.

    >>> load_image("cat.jpg", image_size=224).shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
    """
    path = Path(path)
    if interpolation not in INTERPOLATIONS:
        raise AutoftError(f"Unknown interpolation {interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}.")
    try:
        array = _decode(path, image_size, INTERPOLATIONS[interpolation])
    except DECODE_ERRORS as exc:
        raise AutoftError(f"Cannot read image {path}: {exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def decode_all(items: list[formats.Item], size: int, resample: Image.Resampling) -> tuple[torch.Tensor, list[int]]:
    """Decode ``items`` in a thread pool into one uint8 ``(N, 3, S, S)`` tensor; returns it and the failed rows.

    Rows of failed images (unreadable, missing, empty bytes) are left as zeros; the caller drops them.
    """
    out = torch.zeros((len(items), 3, size, size), dtype=torch.uint8)
    failed: list[int] = []

    def work(i: int) -> None:
        try:
            arr = _decode(items[i], size, resample)
        except DECODE_ERRORS:
            failed.append(i)  # list.append is atomic under the GIL
            return
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)

    # PIL releases the GIL while decoding and resizing, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2)) as pool:
        list(pool.map(work, range(len(items))))
    return out, sorted(failed)
