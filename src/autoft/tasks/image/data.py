"""Image data: find the splits, decode every image once at working resolution (decode.py decodes one,
transforms.py augments).

Image folders are read here; manifests, Parquet and CIFAR batches by ``formats.py``, into the same decoding.

Images are decoded and resized exactly once (in a thread pool), into one uint8 tensor per split, and every epoch after
that is tensor slicing. With a cache folder (the default in a search) the tensors are files mapped from the cache
(decoded straight into them the first time), so a set larger than the RAM is read per batch from the page cache; a
subset of a mapped split (train/val split off one folder) is copied into memory when the whole split is within
:func:`memory_bound` (train and val together: the bound holds for both), and past it written beside the entry and
mapped too. Mapped splits are :class:`~autoft.tasks.base.MappedSplit`: a local Ray worker maps the same file.
Augmentation runs on uint8 batches on whatever device they live on; normalization comes last.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autoft.config import DATA_MEMORY_ENV, IMAGE_SUFFIXES
from autoft.errors import AutoftError, closest
from autoft.tasks.base import Dataset, MappedSplit, TensorSplit, take_rows
from autoft.tasks.image import cache, decode, formats
from autoft.tasks.image.decode import load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "ImageSet",
    "find_images",
    "load_image",
    "load_image_folder",
    "load_images",
    "memory_bound",
    "merged",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(IMAGE_SUFFIXES)
# One decoded split: ``images`` uint8 ``(N, 3, S, S)`` and ``labels`` int64 ``(N,)``.
ImageSet = TensorSplit


# ----------------------------------------------------------------------------- finding files


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def _scan_split(folder: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` for one split folder, with errors for the empty cases."""
    dirs = _class_dirs(folder)
    if not dirs:
        raise AutoftError(
            f"Data folder {folder} has no class folders; put the images in one subfolder per class "
            f"(e.g. {folder}/cat/1.jpg, {folder}/dog/2.jpg)."
        )
    files = {d.name: _image_files(d) for d in dirs}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise AutoftError(
            f"Class folder {folder / empty[0]} has no images (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            + (f" (also empty: {', '.join(empty[1:])})." if len(empty) > 1 else ".")
        )
    return files


def _check_same_classes(train: dict[str, list[Path]], other: dict[str, list[Path]], split: Path) -> None:
    missing_here = sorted(set(train) - set(other))
    missing_train = sorted(set(other) - set(train))
    if missing_here or missing_train:
        raise AutoftError(
            f"Class folders in {split} differ from those in {split.parent / 'train'}: "
            f"missing in {split.name}/: {missing_here or 'none'}; "
            f"missing in train/: {missing_train or 'none'}; "
            "give every split the same class folders."
        )


# ----------------------------------------------------------------------------- splitting


def _stratified_split(
    labels: torch.Tensor, *, n_classes: int, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and val row indices; every class keeps at least one image on each side."""
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    lab = labels.numpy()
    for c in range(n_classes):
        rows = np.flatnonzero(lab == c)
        rows = rows[rng.permutation(len(rows))]
        n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
        val_idx.append(np.sort(rows[:n_val]))
        train_idx.append(np.sort(rows[n_val:]))
    return torch.from_numpy(np.concatenate(train_idx)), torch.from_numpy(np.concatenate(val_idx))


def _select(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> ImageSet:
    return ImageSet(take_rows(images, rows), labels.index_select(0, rows))


# ----------------------------------------------------------------------------- loading


def _check_options(image_size: int, val_fraction: float, interpolation: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise AutoftError(f"image_size must be an integer of at least 8, but got {image_size!r}.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0.0 < val_fraction < 1.0:
        raise AutoftError(
            f"val_fraction must be a number strictly between 0 and 1 (e.g. 0.2), but got {val_fraction!r}."
        )
    if interpolation not in decode.INTERPOLATIONS:
        hint = closest(str(interpolation), decode.INTERPOLATIONS)
        raise AutoftError(
            f"Unknown interpolation {interpolation!r}; use one of {', '.join(decode.INTERPOLATIONS)}"
            + (f" (did you mean {hint[0]!r}?)." if hint else ".")
        )


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise AutoftError(f"Data path {root} does not exist; pass the folder that holds your images.")
    if not root.is_dir():
        raise AutoftError(
            f"Data path {root} is a file, not a folder or a data file autoft reads (a CSV/TSV manifest, Parquet, "
            "CIFAR batches); pass a folder with one subfolder per class (or train/ and val/ subfolders)."
        )


def _split_folders(root: Path) -> dict[str, Path]:
    """Which split folders ``root`` holds: ``{"train", "val"?, "test"?}`` or ``{"all"}`` for a flat layout."""
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" in names:
        return {s: root / s for s in ("train", "val", "test") if s in names}
    if "val" in names or "test" in names:
        raise AutoftError(
            f"Data folder {root} has val/ or test/ but no train/; add {root / 'train'} "
            "(or put the class folders directly in the data folder)."
        )
    return {"all": root}


def load_images(
    root: str | Path,
    *,
    image_size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    interpolation: str = "bicubic",
    cache_dir: Path | None = None,
) -> Dataset:
    """Load image data in any format autoft reads, decoded once at ``image_size``, detected by content.

    Image folders (see :func:`load_image_folder`); a CSV/TSV manifest (``path,label``, paths relative to it);
    Parquet files as Hugging Face ``datasets`` writes them (an image-bytes column and a label column); CIFAR-10/100
    batches, python or binary version. A folder of split files (``train.csv``, ``validation.parquet``,
    ``data_batch_1`` ... ``test_batch``) gives its splits; without a val split, train is split like folders are.
    With ``cache_dir`` the decoded images are kept there and mapped by later calls (``cache.py``).

    >>> ds = load_images("cifar-10-batches-py", image_size=32)  # doctest: +SKIP
    >>> ds.classes[:2], len(ds.test)  # doctest: +SKIP
    (('airplane', 'automobile'), 10000)
    """
    root = Path(root).expanduser()
    _check_options(image_size, val_fraction, interpolation)
    found = formats.read(root) if root.exists() else None
    if found is None:
        return load_image_folder(
            root, image_size=image_size, val_fraction=val_fraction, seed=seed, interpolation=interpolation,
            cache_dir=cache_dir,
        )  # fmt: skip
    if len(found.classes) < 2:
        raise AutoftError(
            f"Data {root} has only one class ({found.classes[0]!r}); classification needs at least two classes."
        )
    dataset = _decode_parts(
        found.parts, found.classes, root, class_folders=False, image_size=image_size, val_fraction=val_fraction,
        seed=seed, interpolation=interpolation, cache_dir=cache_dir,
    )  # fmt: skip
    logger.info("Loaded %s (%s): %s", root, found.kind, dataset.summary())
    return dataset


def load_image_folder(
    root: str | Path,
    *,
    image_size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    interpolation: str = "bicubic",
    cache_dir: Path | None = None,
) -> Dataset:
    """Load an image-folder data set into memory, decoded once at ``image_size``.

    Layouts: ``root/train/<class>/*`` + ``root/val/<class>/*`` (+ optional ``root/test/<class>/*``),
    or ``root/<class>/*``. Without a val folder, train is split stratified by ``val_fraction`` and
    ``seed`` (every class keeps at least one image on each side). Unreadable files are skipped
    with one warning and counted in ``Dataset.skipped``.

    >>> ds = load_image_folder("data/flowers", image_size=224, val_fraction=0.2, seed=0)  # doctest: +SKIP
    >>> ds.classes, ds.train.images.shape  # doctest: +SKIP
    (('daisy', 'rose', 'tulip'), torch.Size([2936, 3, 224, 224]))
    """
    root = Path(root).expanduser()
    _check_options(image_size, val_fraction, interpolation)
    _check_folder(root)
    folders = _split_folders(root)
    files = {split: _scan_split(folder) for split, folder in folders.items()}
    first = "train" if "train" in files else "all"
    classes = tuple(files[first])
    for split in ("val", "test"):
        if split in files:
            _check_same_classes(files[first], files[split], folders[split])
    if len(classes) < 2:
        raise AutoftError(
            f"Data folder {folders[first]} has only one class folder ({classes[0]!r}); "
            "classification needs at least two, one subfolder per class."
        )
    parts = {}
    for split, per_class in files.items():
        paths: list[formats.Item] = [p for name in classes for p in per_class[name]]
        labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
        parts[split] = formats.Part(paths, labels, [str(p) for p in paths], folders[split])
    dataset = _decode_parts(
        parts, classes, root, class_folders=True, image_size=image_size, val_fraction=val_fraction, seed=seed,
        interpolation=interpolation, cache_dir=cache_dir,
    )  # fmt: skip
    logger.info("Loaded %s: %s", root, dataset.summary())
    return dataset


def _decode_parts(
    parts: dict[str, formats.Part],
    classes: tuple[str, ...],
    root: Path,
    *,
    class_folders: bool,
    image_size: int,
    val_fraction: float,
    seed: int,
    interpolation: str,
    cache_dir: Path | None,
) -> Dataset:
    """Decode every split once (or map it from ``cache_dir``); drop (and count, with one warning) what cannot be
    read; split off val if needed."""
    first = "train" if "train" in parts else "all"
    if cache_dir is None:
        stored, entry = {split: _decode_part(part, image_size, interpolation) for split, part in parts.items()}, None
        inputs = "images decoded into memory (no cache)"
    else:
        stored, entry, inputs = _cached(parts, classes, root, cache_dir, image_size, interpolation)
    decoded: dict[str, ImageSet] = {}
    skipped: list[str] = []
    for split, (images, labels, names) in stored.items():
        path = entry / f"{split}.images.npy" if entry is not None and len(images) else None
        decoded[split] = MappedSplit(images, labels, path) if path is not None else ImageSet(images, labels)
        skipped += names
        need = 2 if split == first and "val" not in parts else 1  # splitting needs one train + one val
        place = parts[split].place
        _check_not_emptied(decoded[split], classes, place, need=need, class_folders=class_folders)

    if skipped:
        names = ", ".join(skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        logger.warning(
            "Skipped %d unreadable image file(s) (missing, corrupt or empty): %s%s.", len(skipped), names, more
        )

    if "val" in decoded:
        train, val = decoded[first], decoded["val"]
    else:
        rows = _stratified_split(decoded[first].labels, n_classes=len(classes), val_fraction=val_fraction, seed=seed)
        tag = f"{first}.seed{seed}.val{val_fraction:g}"  # names a mapped subset's file in the entry
        whole = decoded[first]
        mapped = entry is not None and len(whole) * whole.images[0].numel() > memory_bound()  # train + val together
        train, val = (
            _subset(whole, r, entry if mapped else None, f"{tag}.{side}")
            for r, side in zip(rows, ("train", "val"), strict=True)
        )
    return Dataset(
        classes=classes,
        train=train,
        val=val,
        test=decoded.get("test"),
        root=root.resolve(),
        image_size=image_size,
        skipped=len(skipped),
        inputs=inputs,  # the plan's data line shows it
        cache_entry=entry,  # the probe's measurements are kept beside it (autoft.probe_cache)
    )


def _cached(
    parts: dict[str, formats.Part], classes: tuple[str, ...], root: Path, cache_dir: Path, image_size: int,
    interpolation: str,
) -> tuple[cache.Decoded, Path, str]:  # fmt: skip
    """The splits mapped from the cache entry of ``parts``, decoded straight into it first if it has none; the
    entry; and the plan's line about it."""
    name = cache.key(parts, classes, image_size=image_size, interpolation=interpolation)
    stored, how = cache.load(cache_dir, name), "mapped from"
    if stored is None:
        resample = decode.INTERPOLATIONS[interpolation]
        cache.write(cache_dir, name, parts, lambda part, out: decode.decode_into(part.items, out, image_size, resample),
                    source=root.resolve(), image_size=image_size, interpolation=interpolation)  # fmt: skip
        stored, how = cache.load(cache_dir, name), "decoded into"
    if stored is None:
        raise AutoftError(f"The image cache entry {cache_dir / name} was removed while loading; run again.")
    disk = sum(images.numel() for images, _, _ in stored.values()) / 2**20
    return stored, cache_dir / name, f"images {how} the cache {cache_dir / name} ({disk:.1f} MiB on disk)"


def memory_bound() -> int:
    """Bytes of decoded images a split may copy into memory: ``$AUTOFT_DATA_MEMORY`` GiB, else a quarter of RAM.

    Past it, subsets of mapped splits are written beside their cache entry and mapped instead (read per batch).
    """
    text = os.environ.get(DATA_MEMORY_ENV, "").strip()
    if not text:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not 0 < gib < float("inf"):
        raise AutoftError(f"{DATA_MEMORY_ENV} must be a positive number of GiB (e.g. 4 or 0.5), but got {text!r}.")
    return int(gib * 2**30)


def _subset(split: ImageSet, rows: torch.Tensor, entry: Path | None, tag: str) -> ImageSet:
    """The ``rows`` of ``split``: copied into memory, or with a cache ``entry`` (a mapped split past
    :func:`memory_bound`) a mapped file of their own in it."""
    if entry is None:
        return _select(split.images, split.labels, rows)
    images = cache.derived(entry, tag, split.images, rows)
    return MappedSplit(images, split.labels.index_select(0, rows), entry / f"{tag}.images.npy")


def merged(first: ImageSet, second: ImageSet) -> ImageSet:
    """The two splits as one (the refit trains on train + val): in memory within :func:`memory_bound`; past it, two
    splits mapped from one cache entry are joined into a file beside them and mapped, as :func:`_subset` does.

    >>> len(merged(train, val)) == len(train) + len(val)  # doctest: +SKIP
    True
    """
    labels = torch.cat([first.labels, second.labels])
    paths = [s.path if isinstance(s, MappedSplit) else None for s in (first, second)]
    size = len(labels) * (first.images[0].numel() if len(first) else 0)
    if None in paths or paths[0].parent != paths[1].parent or size <= memory_bound():
        return ImageSet(torch.cat([first.images, second.images]), labels)
    entry, names = paths[0].parent, [p.name.removesuffix(".images.npy") for p in paths]
    tag = f"joined.{names[0]}+{names[1]}"
    return MappedSplit(cache.joined(entry, tag, first.images, second.images), labels, entry / f"{tag}.images.npy")


def _decode_part(
    part: formats.Part, image_size: int, interpolation: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split decoded into memory: images and labels of the readable rows, names of the rest."""
    images = torch.empty((len(part.items), 3, image_size, image_size), dtype=torch.uint8)
    failed = decode.decode_into(part.items, images, image_size, decode.INTERPOLATIONS[interpolation])
    readable = torch.ones(len(part.items), dtype=torch.bool)
    readable[failed] = False
    labels = torch.tensor(part.labels, dtype=torch.int64)[readable]
    return images[: len(labels)], labels, [part.names[i] for i in failed]


def _check_not_emptied(
    split: ImageSet, classes: tuple[str, ...], place: Path, *, need: int, class_folders: bool
) -> None:
    """Raise if unreadable images left a class with fewer readable images than ``need``."""
    counts = torch.bincount(split.labels, minlength=len(classes)).tolist()
    short = [(name, n) for name, n in zip(classes, counts, strict=True) if n < need]
    if not short:
        return
    name, n = short[0]
    where = f"Class folder {place / name}" if class_folders else f"Class {name!r} in {place}"
    if n == 0:
        fix = "replace the broken files or remove the folder" if class_folders else "fix or remove its rows"
        raise AutoftError(f"{where} has no readable images (all were missing, corrupt or unreadable); {fix}.")
    raise AutoftError(
        f"{where} has only {n} readable image, too few to split into train and val; add images to it, "
        + ("or use train/ and val/ folders so no split is needed." if class_folders else "or give a validation split.")
    )


def find_images(specs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``specs``: files, folders (searched recursively) or glob patterns, in order, no repeats.

    >>> find_images(["cat.jpg", "more/", "shots/*.png"])  # doctest: +SKIP
    [PosixPath('cat.jpg'), PosixPath('more/a.jpg'), PosixPath('shots/b.png')]
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            matches = _image_files(path)
        elif path.is_file():
            matches = [path]
        else:
            pattern = str(path)
            root = Path(pattern.split("*")[0].split("?")[0].split("[")[0] or ".")
            base = root if root.is_dir() else root.parent
            matches = sorted(p for p in base.glob(str(path.relative_to(base))) if p.is_file())
            matches = [p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not matches:
                raise AutoftError(f"{spec} is not an image file, a folder or a glob that matches image files.")
        found.extend(matches)
    if not found:
        raise AutoftError(f"No image files found in {', '.join(map(str, specs))}; give files, folders or globs.")
    return list(dict.fromkeys(found))
