"""Decoded images on disk: decode once per machine, and let later searches, processes and Ray workers map them.

An entry is a folder ``<cache dir>/<key>/`` with one ``.npy`` of uint8 images ``(N, 3, S, S)`` and one of int64
labels per split, plus ``meta.json`` (written last). The key hashes the working resolution, the interpolation, the
class names, the labels and every image's identity (a file's absolute path, size and modification time; encoded
bytes or pixels by content), so a changed, added or removed file gives a new key. An entry is written to a hidden
temporary folder and renamed into place, so a half-written cache is never read. Images are mapped copy-on-write:
processes on one machine share the page cache instead of each holding a decoded copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoft.config import CACHE_ENV as ENV
from autoft.errors import AutoftError
from autoft.tasks.image.formats import Item, Part

__all__ = ["ENV", "Decoded", "Stored", "clear", "entries", "key", "load", "store"]

VERSION = 1  # bump when the layout or the decoding changes, so old entries are never read as new
META = "meta.json"
_ENTRY = re.compile(r"[0-9a-f]{32}")  # a key; its temporary folder is ".<key>.<random>"

# One split as decoding left it: images and labels of the readable rows, and the names of the skipped ones.
Stored = tuple[torch.Tensor, torch.Tensor, list[str]]
Decoded = dict[str, Stored]


def _identity(item: Item) -> bytes:
    if isinstance(item, Path):
        try:
            st = item.stat()
        except OSError:
            return f"{os.path.abspath(item)}\0missing\n".encode()
        return f"{os.path.abspath(item)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
    data = item.tobytes() if isinstance(item, np.ndarray) else item
    return hashlib.blake2b(data, digest_size=16).digest()


def key(parts: dict[str, Part], classes: tuple[str, ...], *, image_size: int, interpolation: str) -> str:
    """The entry name of these splits decoded at ``image_size`` with ``interpolation``.

    >>> key(parts, ("cat", "dog"), image_size=224, interpolation="bicubic")  # doctest: +SKIP
    '3f1c...'
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([VERSION, image_size, interpolation, list(classes)]).encode())
    for split in sorted(parts):
        part = parts[split]
        digest.update(f"\0{split}\0".encode() + np.asarray(part.labels, dtype=np.int64).tobytes())
        for item in part.items:
            digest.update(_identity(item))
    return digest.hexdigest()


def load(directory: Path, name: str) -> Decoded | None:
    """The entry ``name`` mapped from disk (copy-on-write), or None when there is none."""
    entry = directory / name
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None  # absent (or unreadable: decoding again is always correct)
    out: Decoded = {}
    for split in meta["splits"]:
        images = np.load(entry / f"{split}.images.npy", mmap_mode="c")  # shared pages until written (never)
        labels = np.load(entry / f"{split}.labels.npy")
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels), list(meta["skipped"][split]))
    return out


def store(directory: Path, name: str, decoded: Decoded, *, source: Path, image_size: int, interpolation: str) -> Path:
    """Write ``decoded`` as entry ``name``: to a temporary folder, then renamed into place. Returns the entry."""
    need = sum(images.numel() + labels.numel() * 8 for images, labels, _ in decoded.values())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise AutoftError(f"Cannot use the image cache folder {directory} ({exc}); fix --cache-dir or {ENV}.") from None
    if free < need + 64 * 2**20:
        raise AutoftError(
            f"The image cache needs {need / 2**30:.2f} GiB in {directory} but the disk has "
            f"{free / 2**30:.2f} GiB free; free space, or point --cache-dir (or {ENV}) at a larger disk."
        )
    meta = {
        "version": VERSION, "source": str(source), "image_size": image_size, "interpolation": interpolation,
        "splits": {s: len(labels) for s, (_, labels, _) in decoded.items()},
        "skipped": {s: names for s, (_, _, names) in decoded.items()}, "bytes": need, "created": time.time(),
    }  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        for split, (images, labels, _) in decoded.items():
            np.save(tmp / f"{split}.images.npy", images.numpy())
            np.save(tmp / f"{split}.labels.npy", labels.numpy())
        (tmp / META).write_text(json.dumps(meta))  # last: an entry without it is never read
        os.rename(tmp, directory / name)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / name / META).is_file():  # not another process writing the same entry first
            raise
    return directory / name


def entries(directory: Path) -> list[dict[str, Any]]:
    """What the cache holds: one dict per entry (name, source, image_size, images, bytes, created), newest first.

    >>> entries(Path("~/.cache/autoft").expanduser())  # doctest: +SKIP
    [{'name': '3f1c...', 'source': '/data/flowers', 'image_size': 224, ...}]
    """
    found = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        try:
            meta = json.loads((entry / META).read_text())
        except (OSError, ValueError):
            continue
        images = sum(meta["splits"].values())
        found.append({"name": entry.name, "images": images} | {k: meta[k] for k in ("source", "image_size", "bytes")}
                     | {"created": meta["created"]})  # fmt: skip
    return sorted(found, key=lambda e: -e["created"])


def clear(directory: Path) -> int:
    """Remove every entry (and any half-written one) from ``directory``; returns the bytes freed."""
    freed = 0
    for entry in directory.iterdir() if directory.is_dir() else []:
        ours = _ENTRY.fullmatch(entry.name) or (_ENTRY.fullmatch(entry.name[1:33]) and entry.name.startswith("."))
        if entry.is_dir() and ours:  # nothing else in the folder is touched
            freed += sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            shutil.rmtree(entry)
    return freed
