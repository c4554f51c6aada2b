"""Decoding images: one file, encoded bytes or pixels -> uint8 RGB at the working resolution (resize the shorter
side, center crop), and many at once in a thread pool (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from autoft.errors import AutoftError
from autoft.tasks.image import formats

__all__ = ["CHUNK", "DECODE_ERRORS", "INTERPOLATIONS", "decode_into", "load_image", "reporting"]

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


CHUNK = 256  # images decoded between two writes and progress reports: ~38 MB of 224 px decodes held at once

# Who hears of decoding progress: the CLI sets it around a search (a bar on the terminal); the library is silent.
_progress: ContextVar[Callable[[int, int], None] | None] = ContextVar("autoft_decode_progress", default=None)


@contextmanager
def reporting(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(done, total)`` as images are decoded inside this block (in this thread's context).

    >>> with reporting(lambda done, total: print(done, total)):  # doctest: +SKIP
    ...     load_images("data/flowers", image_size=224)
    """
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


class Rows(Protocol):
    """Where decoded images go, row by row: ``out[row] = image`` (uint8 ``(3, S, S)``); an array does."""

    def __setitem__(self, row: int, image: np.ndarray, /) -> None: ...


def decode_into(
    items: list[formats.Item], out: Rows | torch.Tensor, size: int, resample: Image.Resampling
) -> list[int]:
    """Decode ``items`` in a thread pool into the first rows of ``out`` (uint8 ``(N, 3, S, S)``: an array, a
    tensor, a mapped file or the cache's :class:`~autoft.tasks.image.cache.RowFile`); returns the rows of the items
    that failed.

    Readable images are packed in order: ``out[:N - len(failed)]`` holds them. At most ``CHUNK`` decoded images
    wait in memory besides ``out``, so a mapped ``out`` may be larger than the RAM.
    """
    target = out.numpy() if isinstance(out, torch.Tensor) else out
    failed: list[int] = []
    report = _progress.get()

    def work(i: int) -> np.ndarray | None:
        try:
            return _decode(items[i], size, resample)
        except DECODE_ERRORS:
            return None

    def take(i: int, future: Future[np.ndarray | None]) -> None:
        array = future.result()
        if array is None:
            failed.append(i)
        else:
            target[i - len(failed)] = array.transpose(2, 0, 1)
        if report is not None and ((i + 1) % CHUNK == 0 or i + 1 == len(items)):
            report(i + 1, len(items))

    # PIL releases the GIL while decoding and resizing, so threads give real parallelism here; a window of CHUNK
    # submitted images keeps every thread busy without decoding far ahead of the writes.
    pending: deque[tuple[int, Future[np.ndarray | None]]] = deque()
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2)) as pool:
        for i in range(len(items)):
            pending.append((i, pool.submit(work, i)))
            if len(pending) >= CHUNK:
                take(*pending.popleft())
        while pending:
            take(*pending.popleft())
    return failed
