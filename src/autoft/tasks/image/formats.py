"""Image data in the formats users ship, detected by content: CSV/TSV manifests, Parquet, CIFAR batches.

Each reader returns plain :class:`Part` s (encoded images as file paths or bytes, or raw pixel arrays, with
integer labels) and the class names; ``data.py`` decodes them once, exactly like image folders. Nothing here
runs code from a data file: CIFAR's pickles are read by an unpickler that builds only numpy arrays and plain
containers and refuses every other global.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoft.errors import AutoftError

__all__ = ["Found", "Part", "read"]

Item = Path | bytes | np.ndarray  # an image file, its encoded bytes, or uint8 pixels (H, W, 3)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PARQUET_MAGIC = b"PAR1"
_CIFAR_PIXELS = 32 * 32 * 3


@dataclass(frozen=True)
class Part:
    """One split before decoding: ``items[i]`` has label ``labels[i]``; ``names[i]`` says where it came from."""

    items: list[Item]
    labels: list[int]
    names: list[str]
    place: Path  # the file (or folder) the split was read from, for messages


@dataclass(frozen=True)
class Found:
    """A data set read from one of the formats: class names and ``{"train" | "all", "val"?, "test"?: Part}``."""

    classes: tuple[str, ...]
    parts: dict[str, Part]
    kind: str  # "manifest", "parquet", "cifar", "cifar-binary"


def read(root: Path) -> Found | None:
    """The data set at ``root`` if it is one of these formats (a file, or a folder of split files); None for a
    folder of class folders (the image-folder layout, read by ``data.py``).

    >>> read(Path("cifar-10-batches-py")).classes[:2]  # doctest: +SKIP
    ('airplane', 'automobile')
    """
    if root.is_file():
        kind = _file_kind(root)
        if kind is None:
            return None
        return _READERS[kind]({"all": [root]}, root)
    files = {p.name: p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}
    for kind, splits in (
        ("cifar", _cifar_python_files(files)),
        ("cifar-binary", _cifar_binary_files(files)),
        ("parquet", _split_files(files, (".parquet",))),
        ("manifest", _split_files(files, (".csv", ".tsv"))),
    ):
        if splits:
            return _READERS[kind](splits, root)
    return None


def _file_kind(path: Path) -> str | None:
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == _PARQUET_MAGIC:
        return "parquet"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode
        return "cifar"
    if path.suffix.lower() in (".csv", ".tsv"):
        return "manifest"
    if path.suffix.lower() == ".bin":  # no magic number: the reader checks the size is whole records
        return "cifar-binary"
    return None


def _split_files(files: dict[str, Path], suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    """``{split: [files]}`` for ``train.parquet``, ``validation-00000-of-00001.parquet``, ``test.csv``, ..."""
    out: dict[str, list[Path]] = {}
    for _, path in sorted(files.items()):
        if path.suffix.lower() not in suffixes:
            continue
        stem = path.stem.lower().split("-")[0].split(".")[0]
        if stem in SPLIT_NAMES:
            out.setdefault(SPLIT_NAMES[stem], []).append(path)
    return out if "train" in out else {}


# ----------------------------------------------------------------------------- labels


def _classes_and_labels(raw: dict[str, list[Any]], place: Path, names: Sequence[str] | None) -> tuple[tuple, dict]:
    """Class names and integer labels from raw labels (class names, or whole numbers with optional ``names``)."""
    first = "train" if "train" in raw else "all"
    if names is not None:
        classes = tuple(str(n) for n in names)
        for split, values in raw.items():
            bad = [v for v in values if not 0 <= int(v) < len(classes)]
            if bad:
                raise AutoftError(
                    f"{place} ({split}) has label {bad[0]} but names only {len(classes)} classes; "
                    "fix the labels or the class names in the file's metadata."
                )
        return classes, {split: [int(v) for v in values] for split, values in raw.items()}
    values = sorted(set(raw[first]), key=lambda v: (isinstance(v, str), v))
    index = {v: i for i, v in enumerate(values)}
    for split, labels in raw.items():
        unknown = sorted({str(v) for v in labels if v not in index})
        if unknown:
            raise AutoftError(
                f"{place}: the {split} split has label(s) {', '.join(unknown[:3])} that train does not have; "
                "every class needs training examples."
            )
    return tuple(str(v) for v in values), {split: [index[v] for v in labels] for split, labels in raw.items()}


def _whole_label(value: str, where: str) -> str | int:
    """A manifest label: a class name, or a whole number; a fractional number is refused."""
    text = value.strip()
    if not text:
        raise AutoftError(f"{where} has an empty label; give every row a class name or a whole-number label.")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        float(text)
    except ValueError:
        return text
    raise AutoftError(
        f"{where} has the label {text!r}, a fractional number; labels must be class names or whole numbers "
        "(autoft classifies, it does not regress)."
    )


# ----------------------------------------------------------------------------- CSV / TSV manifests


def _read_manifests(splits: dict[str, list[Path]], root: Path) -> Found:
    raw: dict[str, list[Any]] = {}
    items: dict[str, list[Item]] = {}
    for split, paths in splits.items():
        raw[split], items[split] = [], []
        for path in paths:
            files, labels = _read_manifest(path)
            items[split] += files
            raw[split] += labels
    classes, labels = _classes_and_labels(raw, root, None)
    parts = {s: Part(items[s], labels[s], [str(p) for p in items[s]], splits[s][0]) for s in splits}
    return Found(classes, parts, "manifest")


def _read_manifest(path: Path) -> tuple[list[Item], list[Any]]:
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.partition("\n")[0] else ","
    rows = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in next(rows, [])]
    if len(header) == 2 and "path" not in header:
        raise AutoftError(
            f"Manifest {path} line 1 names columns {', '.join(header)}; name the image column path (path,label)."
        )
    if len(header) != 2:
        extra = f" ({', '.join(header)})" if header else ""
        raise AutoftError(
            f"Manifest {path} line 1 has {len(header)} column(s){extra}; a manifest has exactly two, "
            "path and label (one label per image; remove the other columns)."
        )
    at_path = header.index("path")
    files: list[Item] = []
    labels: list[Any] = []
    for row in rows:
        if not row or not any(c.strip() for c in row):
            continue
        where = f"Manifest {path} line {rows.line_num}"
        if len(row) != 2:
            raise AutoftError(f"{where} has {len(row)} fields; every row needs a path and a label, like the header.")
        if not row[at_path].strip():
            raise AutoftError(f"{where} column {at_path + 1} (path) is empty; give the image's path.")
        files.append(path.parent / row[at_path].strip())  # relative to the manifest; absolute paths stay absolute
        labels.append(_whole_label(row[1 - at_path], f"{where} column {2 - at_path} (label)"))
    if not files:
        raise AutoftError(f"Manifest {path} has a header but no rows; add one path,label row per image.")
    return files, labels


# ----------------------------------------------------------------------------- Parquet (Hugging Face datasets)


def _read_parquets(splits: dict[str, list[Path]], root: Path) -> Found:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AutoftError(f"Reading {root} needs pyarrow; install it with pip install 'autoft[parquet]'.") from None
    raw: dict[str, list[Any]] = {}
    items: dict[str, list[Item]] = {}
    names: dict[str, list[str]] = {}
    class_names: Sequence[str] | None = None
    for split, paths in splits.items():
        raw[split], items[split], names[split] = [], [], []
        for path in paths:
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
                raise AutoftError(f"Parquet file {path} cannot be read ({exc}); check the file is complete.") from None
            image, label = _parquet_columns(table, path)
            class_names = class_names or _hf_class_names(table.schema.metadata, label)
            cells, values = table.column(image).to_pylist(), table.column(label).to_pylist()
            for row, (cell, value) in enumerate(zip(cells, values, strict=True)):
                encoded = cell.get("bytes") if isinstance(cell, dict) else cell
                if value is None:
                    raise AutoftError(
                        f"Parquet file {path} row {row} column {label!r} has no label; fill it or drop the row."
                    )
                items[split].append(encoded if encoded is not None else b"")  # empty: counted as unreadable
                raw[split].append(value)
                source = cell.get("path") if isinstance(cell, dict) else None
                names[split].append(f"{path} row {row}" + (f" ({source})" if source else ""))
    classes, labels = _classes_and_labels(raw, root, class_names)
    parts = {s: Part(items[s], labels[s], names[s], splits[s][0]) for s in splits}
    return Found(classes, parts, "parquet")


def _parquet_columns(table: Any, path: Path) -> tuple[str, str]:
    """The image column (binary, or a struct with ``bytes``) and the label column (integers or strings)."""
    import pyarrow as pa

    def is_image(t: Any) -> bool:
        return (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        )

    fields = {f.name: f.type for f in table.schema}
    images = [n for n, t in fields.items() if is_image(t)]
    if len(images) != 1:
        raise AutoftError(
            f"Parquet file {path} has {len(images)} image-bytes columns ({', '.join(images) or 'none'}) among "
            f"{', '.join(fields)}; it needs exactly one (binary, or a struct with a bytes field as datasets writes)."
        )
    others = [n for n in fields if n != images[0]]
    named = [n for n in others if n.lower() in ("label", "labels")]
    if len(named) != 1 and len(others) != 1:
        raise AutoftError(
            f"Parquet file {path} has columns {', '.join(others)} beside {images[0]!r}; autoft needs one label "
            "column, named label (drop or rename the others)."
        )
    label = named[0] if len(named) == 1 else others[0]
    kind = fields[label]
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise AutoftError(
            f"Parquet file {path} column {label!r} holds {kind} values; labels must be integers or class names "
            "(a float column is a regression target, which autoft does not fit)."
        )
    return images[0], label


def _hf_class_names(metadata: dict[bytes, bytes] | None, label: str) -> list[str] | None:
    """Class names of a ``ClassLabel`` feature from the ``huggingface`` schema metadata that datasets writes."""
    try:
        info = json.loads((metadata or {})[b"huggingface"])
        names = info["info"]["features"][label]["names"]
    except (KeyError, TypeError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


# ----------------------------------------------------------------------------- CIFAR (python and binary versions)

# The globals a CIFAR batch pickle needs to rebuild its numpy arrays (numpy 1 and 2 module names; protocol 5's
# buffer form; protocol 2 written by Python 3 stores bytes via _codecs.encode); nothing else.
_SAFE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only plain containers and numpy arrays; any other global (a function, a class) is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise AutoftError(
            f"CIFAR file {self.path} refers to {module}.{name}, which is not data; autoft reads only the dict of "
            "arrays and lists a CIFAR batch holds and never runs code from a data file — use the original batches."
        )


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            obj = _DataOnlyUnpickler(handle, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise AutoftError(f"CIFAR file {path} is not a readable pickle ({exc}); download it again.") from None
    if not isinstance(obj, dict):
        raise AutoftError(f"CIFAR file {path} holds a {type(obj).__name__}, not the dict of a CIFAR batch.")
    out = {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    for key, value in out.items():
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise AutoftError(f"CIFAR file {path} key {key!r} holds Python objects, not numbers; use the original.")
    return out


def _cifar_python_files(files: dict[str, Path]) -> dict[str, list[Path]]:
    train = sorted(p for n, p in files.items() if n.startswith("data_batch_") and not n.endswith(".bin"))
    if train:  # CIFAR-10
        return {"train": train} | ({"test": [files["test_batch"]]} if "test_batch" in files else {})
    if "train" in files and "meta" in files:  # CIFAR-100
        return {"train": [files["train"]]} | ({"test": [files["test"]]} if "test" in files else {})
    return {}


def _read_cifar_python(splits: dict[str, list[Path]], root: Path) -> Found:
    items: dict[str, list[Item]] = {}
    raw: dict[str, list[Any]] = {}
    for split, paths in splits.items():
        items[split], raw[split] = [], []
        for path in paths:
            batch = _unpickle(path)
            key = "labels" if "labels" in batch else "fine_labels"
            pixels = batch.get("data")
            if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != _CIFAR_PIXELS:
                raise AutoftError(
                    f"CIFAR file {path} has no 'data' array of shape (N, {_CIFAR_PIXELS}); it is not a CIFAR batch."
                )
            labels = batch.get(key)
            if labels is None or len(labels) != len(pixels):
                raise AutoftError(f"CIFAR file {path} has no {key!r} list with one label per image.")
            if any(isinstance(v, float) for v in list(labels)) or np.asarray(labels).dtype.kind == "f":
                raise AutoftError(f"CIFAR file {path} key {key!r} holds fractional numbers; labels must be integers.")
            items[split] += list(_cifar_images(pixels.astype(np.uint8, copy=False)))
            raw[split] += [int(v) for v in labels]
    folder = root if root.is_dir() else root.parent
    meta = folder / "batches.meta" if (folder / "batches.meta").is_file() else folder / "meta"
    names = None
    if meta.is_file():
        info = _unpickle(meta)
        listed = info.get("label_names") or info.get("fine_label_names")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in listed] if listed else None
    return _cifar_found(items, raw, root, names, "cifar")


def _cifar_images(pixels: np.ndarray) -> np.ndarray:
    """``(N, 3072)`` rows (1024 red, 1024 green, 1024 blue) -> ``(N, 32, 32, 3)``."""
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_found(
    items: dict[str, list[Item]], raw: dict[str, list[Any]], root: Path, names: list[str] | None, kind: str
) -> Found:
    if names is None:
        names = [str(i) for i in range(max(max(v) for v in raw.values()) + 1)]
    classes, labels = _classes_and_labels(raw, root, names)
    parts = {s: Part(items[s], labels[s], [f"{root} {s} image {i}" for i in range(len(items[s]))], root) for s in items}
    return Found(classes, parts, kind)


def _cifar_binary_files(files: dict[str, Path]) -> dict[str, list[Path]]:
    train = sorted(p for n, p in files.items() if n.startswith("data_batch_") and n.endswith(".bin"))
    if train:  # CIFAR-10
        return {"train": train} | ({"test": [files["test_batch.bin"]]} if "test_batch.bin" in files else {})
    if "train.bin" in files:  # CIFAR-100
        return {"train": [files["train.bin"]]} | ({"test": [files["test.bin"]]} if "test.bin" in files else {})
    return {}


def _read_cifar_binary(splits: dict[str, list[Path]], root: Path) -> Found:
    paths = [p for files in splits.values() for p in files]
    cifar100 = all(p.name in ("train.bin", "test.bin") for p in paths) or all(
        p.stat().st_size % (_CIFAR_PIXELS + 1) and not p.stat().st_size % (_CIFAR_PIXELS + 2) for p in paths
    )
    label_bytes = 2 if cifar100 else 1  # CIFAR-100: coarse then fine label
    record = label_bytes + _CIFAR_PIXELS
    items: dict[str, list[Item]] = {}
    raw: dict[str, list[Any]] = {}
    for split, paths in splits.items():
        items[split], raw[split] = [], []
        for path in paths:
            blob = np.fromfile(path, dtype=np.uint8)
            if blob.size == 0 or blob.size % record:
                raise AutoftError(
                    f"CIFAR binary file {path} has {blob.size} bytes, not a whole number of {record}-byte records "
                    f"({label_bytes} label byte(s) + {_CIFAR_PIXELS} pixels); it is truncated or not a CIFAR batch."
                )
            rows = blob.reshape(-1, record)
            items[split] += list(_cifar_images(rows[:, label_bytes:]))
            raw[split] += rows[:, label_bytes - 1].astype(int).tolist()
    folder = root if root.is_dir() else root.parent
    listing = folder / ("fine_label_names.txt" if cifar100 else "batches.meta.txt")
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()] if listing.is_file() else None
    return _cifar_found(items, raw, root, names, "cifar-binary")


_READERS = {
    "manifest": _read_manifests,
    "parquet": _read_parquets,
    "cifar": _read_cifar_python,
    "cifar-binary": _read_cifar_binary,
}
