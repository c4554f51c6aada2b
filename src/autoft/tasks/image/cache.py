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
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoft.config import CACHE_ENV as ENV
from autoft.errors import AutoftError
from autoft.tasks import pages
from autoft.tasks.image.formats import Item, Part

__all__ = [
    "ENV",
    "Decoded",
    "RowFile",
    "Stored",
    "check_room",
    "clear",
    "derived",
    "entries",
    "joined",
    "key",
    "load",
    "need_bytes",
    "write",
]

VERSION = 1  # bump when the layout or the decoding changes, so old entries are never read as new
META = "meta.json"
_ENTRY = re.compile(r"[0-9a-f]{32}")  # a key; its temporary folder is ".<key>.<random>"
_SPARE = 64 * 2**20  # left free on the disk beyond the entry itself
_COPY_ROWS = 64  # rows copied at once into a derived split (random rows: each may map pages.GRAIN)
_HEADERS = {  # .npy format version -> its header reader and writer (open_memmap writes 1.0, or 2.0 if it must)
    (1, 0): (np.lib.format.read_array_header_1_0, np.lib.format.write_array_header_1_0),
    (2, 0): (np.lib.format.read_array_header_2_0, np.lib.format.write_array_header_2_0),
}

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
        path = entry / f"{split}.images.npy"  # mapped (shared pages, never written); an empty split: nothing to map
        images = pages.mapped(path) if meta["splits"][split] else torch.from_numpy(np.load(path))
        labels = np.load(entry / f"{split}.labels.npy")
        out[split] = (images, torch.from_numpy(labels), list(meta["skipped"][split]))
    return out


# Decodes one split into the first rows of ``out`` (``out[row] = image``, uint8 (3, S, S)) and returns the rows
# that failed.
DecodeSplit = Callable[[Part, "RowFile"], list[int]]


class RowFile:
    """The rows of a new uint8 ``.npy`` file of ``shape``, each written with ``out[row] = image`` by ``pwrite``.

    Not through a mapping: writing a new file's pages through one faults each 4 KiB page in one at a time (0.24-0.32
    ms per 224 px image measured here, against 0.14-0.17 ms with pwrite), and none of the file's pages are ever
    resident in this process.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # the header; the size
        self.offset, self.row_bytes = header.offset, int(np.prod(shape[1:], dtype=np.int64))
        del header
        self._fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, row: int, image: np.ndarray) -> None:
        self.write(row, image)

    def write(self, first: int, rows: np.ndarray) -> None:
        """``rows`` (one row, or several in order) written from row ``first`` on."""
        data = memoryview(np.ascontiguousarray(rows, dtype=np.uint8)).cast("B")
        at = self.offset + first * self.row_bytes
        while data:  # a regular file takes all of it at once; the loop is for the exception
            written = os.pwrite(self._fd, data, at)
            data, at = data[written:], at + written

    def close(self) -> None:
        os.close(self._fd)


def need_bytes(parts: dict[str, Part], *, image_size: int) -> int:
    """Disk the entry of ``parts`` at ``image_size`` needs at most (every image readable)."""
    return sum(len(part.items) * (3 * image_size * image_size + 8) for part in parts.values())


def check_room(directory: Path, need: int) -> None:
    """Create ``directory`` if needed and raise one clear error when its disk has less than ``need`` bytes free."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise AutoftError(
            f"Cannot use the image cache folder {directory} ({exc}); point --cache-dir (or {ENV}) at a folder you "
            "can write, or pass --no-cache."
        ) from None
    if free < need + _SPARE:
        raise AutoftError(
            f"The image cache needs {need / 2**30:.2f} GiB in {directory} but the disk has {free / 2**30:.2f} GiB "
            f"free; free space, point --cache-dir (or {ENV}) at a larger disk, or pass --no-cache."
        )


def write(
    directory: Path, name: str, parts: dict[str, Part], decode_split: DecodeSplit, *, source: Path, image_size: int,
    interpolation: str,
) -> Path:  # fmt: skip
    """Decode ``parts`` straight into entry ``name``'s files (:class:`RowFile`, never all in RAM): in a temporary
    folder, then renamed into place. The disk is checked first, so a too-small one fails before any decoding.
    """
    check_room(directory, need_bytes(parts, image_size=image_size))
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the entry from other users of the machine
        counts, skipped = {}, {}
        for split, part in parts.items():
            counts[split], skipped[split] = _write_split(tmp, split, part, decode_split, image_size)
        meta = {
            "version": VERSION, "source": str(source), "image_size": image_size, "interpolation": interpolation,
            "splits": counts, "skipped": skipped, "bytes": _size(tmp), "created": time.time(),
        }  # fmt: skip
        (tmp / META).write_text(json.dumps(meta))  # last: an entry without it is never read
        os.rename(tmp, directory / name)
    except BaseException as exc:  # an interrupt mid-decode too: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(exc, OSError) and (directory / name / META).is_file()):
            raise  # (an OSError while another process renamed the same entry first is no error)
    return directory / name


def _write_split(tmp: Path, split: str, part: Part, decode_split: DecodeSplit, image_size: int) -> tuple[int, list]:
    """One split's images decoded into its file, shrunk to the readable ones; its labels beside them."""
    path = tmp / f"{split}.images.npy"
    images = RowFile(path, (len(part.items), 3, image_size, image_size))
    try:
        failed = decode_split(part, images)
    finally:
        images.close()
    readable = np.ones(len(part.items), dtype=bool)
    readable[failed] = False
    if failed:
        _shrink(path, int(readable.sum()))
    np.save(tmp / f"{split}.labels.npy", np.asarray(part.labels, dtype=np.int64)[readable])
    return int(readable.sum()), [part.names[i] for i in failed]


def _shrink(path: Path, rows: int) -> None:
    """Keep the first ``rows`` rows of a .npy file in place: a new header (numpy pads it so that the row count's
    digits never change its length), then the file cut after the last row."""
    with open(path, "r+b") as f:
        read_header, write_header = _HEADERS[np.lib.format.read_magic(f)]
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        header = io.BytesIO()
        write_header(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                              "shape": (rows, *shape[1:])})  # fmt: skip
        if len(header.getvalue()) != offset:
            raise OSError(f"cannot shrink {path} in place (header size changed)")
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def derived(entry: Path, tag: str, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The ``rows`` of mapped ``images`` as a file of their own in ``entry`` (written once, then renamed), mapped.

    A subset of a mapped split (the train/val split of a flat layout) that must not be copied into memory.
    """
    order = rows.numpy()
    chunks = ((images, order[start : start + _COPY_ROWS]) for start in range(0, len(order), _COPY_ROWS))
    return _written(entry, tag, (len(order), *images.shape[1:]), chunks)


def joined(entry: Path, tag: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first``'s rows, then ``second``'s, as a file of their own in ``entry`` (written once), mapped.

    Two mapped splits joined without holding both in memory (the refit trains on train + val).
    """
    chunks = (
        (part, np.arange(start, min(start + _COPY_ROWS, len(part))))
        for part in (first, second)
        for start in range(0, len(part), _COPY_ROWS)
    )
    return _written(entry, tag, (len(first) + len(second), *first.shape[1:]), chunks)


def _written(
    entry: Path, tag: str, shape: tuple[int, ...], chunks: Iterable[tuple[torch.Tensor, np.ndarray]]
) -> torch.Tensor:
    """The file ``<tag>.images.npy`` in ``entry``, mapped; written first if absent, from ``chunks`` (a source and
    the rows of it to append next: a bounded slice at a time, never a whole split) to a temporary name, renamed."""
    path = entry / f"{tag}.images.npy"
    if not path.is_file():
        check_room(entry, int(np.prod(shape, dtype=np.int64)))
        handle, name = tempfile.mkstemp(prefix=f".{tag}.", suffix=".npy", dir=entry)
        os.close(handle)
        os.chmod(name, 0o666 & ~_umask())  # readable by whoever may read the entry (mkstemp makes it 0600)
        try:
            out, at = RowFile(Path(name), shape), 0
            try:
                for source, rows in chunks:
                    block = source.numpy()[rows]
                    out.write(at, block)
                    pages.touched(source, block.nbytes, pieces=len(rows))  # the source's pages do not pile up here
                    at += len(rows)
            finally:
                out.close()
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    return pages.mapped(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


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
        found.append({"name": entry.name, "images": images, "bytes": _size(entry)}  # derived splits included
                     | {k: meta[k] for k in ("source", "image_size", "created")})  # fmt: skip
    return sorted(found, key=lambda e: -e["created"])


def clear(directory: Path) -> int:
    """Remove every entry (and any half-written one) from ``directory``; returns the bytes freed."""
    freed = 0
    for entry in directory.iterdir() if directory.is_dir() else []:
        ours = _ENTRY.fullmatch(entry.name) or (_ENTRY.fullmatch(entry.name[1:33]) and entry.name.startswith("."))
        if entry.is_dir() and ours:  # nothing else in the folder is touched
            freed += _size(entry)
            shutil.rmtree(entry)
    return freed
