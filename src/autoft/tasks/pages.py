"""Mapped files read without their pages piling up in the process: the decoded-image cache past the RAM.

A file mapped into a process (the decoded-data cache, :class:`~autoft.tasks.base.MappedSplit`) counts in the
process's resident set page by page as it is read or written, and Linux leaves those pages mapped while RAM is
free: a search over a 15 GB cache file showed 17 GB of RSS (``ru_maxrss``), although none of it was the search's
own memory. Schedulers and users read RSS (Ray's memory monitor, ``top``, cgroup limits), so a search past the RAM
must not look like one that fills it.

Readers and writers of a mapped file therefore report what they touched (:func:`touched`); each time a mapping
has seen ``WINDOW`` bytes since its last release, its pages are dropped from this process with
``madvise(MADV_DONTNEED)``. They stay in the page cache (written pages too: a shared mapping's dirty pages go to
the page cache, not away), so the next read maps them again with a minor fault, or from disk if the kernel needed
the memory. Only mappings made by :func:`mapped` are ever released: releasing anonymous memory would zero it. They
are copy-on-write mappings (``mode="c"``) that autoft never writes, so nothing is lost. (The cache's files are
written with ``pwrite``, ``cache.RowFile``, never through a mapping.)
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

__all__ = ["GRAIN", "WINDOW", "is_mapped", "mapped", "touched"]

WINDOW = 128 * 2**20  # bytes a mapping may touch between two releases: about this much of it stays resident
# What one read fault may map: a page cache of large folios is mapped a whole 2 MiB folio at a time (x86-64's PMD),
# so 16 random rows of 128 KiB read from a 32 MiB file left 26 MiB of it resident (tests/test_pages.py).
GRAIN = 2 * 2**20

_ADVICE = getattr(mmap, "MADV_DONTNEED", None)  # absent where mmap.madvise is (Windows): nothing to release there
_lock = threading.Lock()  # the prefetch thread and the training thread both touch mapped splits
_by_address: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()  # a tensor's start -> map
_since: weakref.WeakKeyDictionary[mmap.mmap, int] = weakref.WeakKeyDictionary()  # bytes touched since the release


def mapped(path: str | Path) -> torch.Tensor:
    """The array in the ``.npy`` file ``path``, mapped copy-on-write (read-only in practice), as a tensor whose
    pages :func:`touched` can release.

    >>> images = mapped("cache/3f1c.../train.images.npy")  # doctest: +SKIP
    """
    array = np.load(path, mmap_mode="c")
    tensor = torch.from_numpy(array)  # shares the mapping and keeps `array` (and its mmap) alive
    if array.size and isinstance(array, np.memmap) and array._mmap is not None:
        with _lock:
            _by_address[tensor.untyped_storage().data_ptr()] = array._mmap
    return tensor


def _mapping(data: torch.Tensor) -> mmap.mmap | None:
    """The mapping made by :func:`mapped` that the tensor ``data`` (or a view of it) lies in, or None."""
    if isinstance(data, torch.Tensor) and data.device.type == "cpu":
        return _by_address.get(data.untyped_storage().data_ptr())
    return None


def is_mapped(data: torch.Tensor) -> bool:
    """Whether ``data`` lies in a mapping made here (one :func:`touched` releases)."""
    return _mapping(data) is not None


def touched(data: torch.Tensor, nbytes: int, *, pieces: int = 1) -> None:
    """Note that ``nbytes`` of ``data``'s mapping were read or written, in ``pieces`` separate places (rows gathered
    in random order); release its pages every ``WINDOW`` bytes the process may have mapped meanwhile.

    Each place counts at least ``GRAIN``: what one fault may map. A no-op for anything not mapped here (tensors
    in memory, on a GPU, features).
    """
    pages = _mapping(data)
    if pages is None or _ADVICE is None or len(pages) <= WINDOW:  # a file within a window may stay resident whole
        return
    with _lock:
        seen = _since.get(pages, 0) + max(nbytes, pieces * GRAIN)
        _since[pages] = 0 if seen >= WINDOW else seen
    if seen >= WINDOW:
        _drop(pages)


def _drop(pages: mmap.mmap) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed meanwhile (nothing left), or refused: only RSS is at stake
        pages.madvise(_ADVICE)
