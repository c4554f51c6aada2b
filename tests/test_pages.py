"""Mapped cache files read and written without their pages piling up in the process (tasks/pages.py), and the
refit's train + val joined into a mapped file past the memory bound."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoft.final import refit_dataset
from autoft.tasks import pages
from autoft.tasks.base import MappedSplit, TensorSplit, batches, take_rows
from autoft.tasks.image import ImageTask, cache, data
from conftest import make_image_folder

linux = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
MiB = 2**20


def _resident(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line: range, perms, ..., pathname
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def _mapped_file(tmp_path: Path, rows: int = 256, row_bytes: int = 128 * 1024) -> tuple[Path, np.ndarray]:
    values = np.random.default_rng(0).integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    path = tmp_path / "split.images.npy"
    np.save(path, values)
    return path, values


@linux
@pytest.mark.parametrize("window", [2 * MiB, 1024 * MiB])
def test_reading_a_mapped_split_keeps_at_most_a_window_of_it_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    path, values = _mapped_file(tmp_path)  # 32 MiB
    monkeypatch.setattr(pages, "WINDOW", window)
    split = MappedSplit(pages.mapped(path), torch.arange(len(values)), path)
    peak = 0
    for shuffle in (True, False):  # gathered rows (training) and views in order (evaluation, caches)
        for images, labels in batches(split, batch_size=16, shuffle=shuffle, generator=torch.Generator()):
            assert torch.equal(images, torch.from_numpy(values[labels.numpy()]))  # nothing lost to a release
            peak = max(peak, _resident(path))
    if window == 2 * MiB:
        assert peak <= 8 * MiB  # a window (2 MiB) plus a batch, not the 32 MiB file
    else:  # the control: without releases the whole file stays resident, so the bound above means something
        assert peak >= 24 * MiB


def test_files_written_from_a_released_mapping_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "WINDOW", 1 * MiB)
    path, values = _mapped_file(tmp_path)
    source = pages.mapped(path)
    rows = torch.from_numpy(np.random.default_rng(1).permutation(len(values)))
    subset = cache.derived(tmp_path, "subset", source, rows)  # written 256 rows at a time, released as it goes
    assert torch.equal(subset, torch.from_numpy(values)[rows])
    both = cache.joined(tmp_path, "both", subset, source)
    assert torch.equal(both, torch.cat([torch.from_numpy(values)[rows], torch.from_numpy(values)]))


def test_memory_that_is_not_mapped_here_is_never_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "WINDOW", 1)
    images = torch.arange(64 * 1024, dtype=torch.int64).to(torch.uint8).view(64, 1024)
    before = images.clone()
    for _ in batches(TensorSplit(images, torch.arange(64)), batch_size=8, shuffle=True):
        pass
    take_rows(images, torch.arange(64))  # madvise(DONTNEED) on anonymous memory would zero it
    assert torch.equal(images, before)


def test_the_refit_joins_train_and_val_into_a_mapped_file_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder(tmp_path / "data", per_class=12)  # train/ and val/: both mapped from the entry
    monkeypatch.setenv("AUTOFT_DATA_MEMORY", "0.000001")  # ~1 KB: train + val are far past it
    loaded = data.load_images(root, image_size=16, cache_dir=tmp_path / "cache")
    refit = refit_dataset(loaded, ImageTask()).train
    assert isinstance(refit, MappedSplit) and refit.path.name == "joined.train+val.images.npy"
    assert refit.path.parent == loaded.cache_entry
    assert torch.equal(refit.images, torch.cat([loaded.train.images, loaded.val.images]))
    assert torch.equal(refit.labels, torch.cat([loaded.train.labels, loaded.val.labels]))
    monkeypatch.setenv("AUTOFT_DATA_MEMORY", "1")  # within the bound: joined in memory, no file
    in_memory = refit_dataset(loaded, ImageTask()).train
    assert not isinstance(in_memory, MappedSplit) and torch.equal(in_memory.images, refit.images)


@linux
def test_a_whole_split_gathered_out_of_a_mapped_file_is_read_a_window_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, values = _mapped_file(tmp_path)  # 32 MiB
    monkeypatch.setattr(pages, "WINDOW", 2 * MiB)
    images, seen = pages.mapped(path), []
    drop = pages._drop
    monkeypatch.setattr(pages, "_drop", lambda mapping: (seen.append(_resident(path)), drop(mapping)))
    rows = torch.randperm(len(values))
    assert torch.equal(take_rows(images, rows), torch.from_numpy(values)[rows])  # e.g. a subset copied to memory
    assert len(seen) >= 8 and max(seen) <= 8 * MiB  # resident just before each release: a window, not the file


def test_shuffled_batches_of_a_mapped_split_are_gathered_ahead_in_a_background_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from autoft.tasks import base

    path, values = _mapped_file(tmp_path, rows=40, row_bytes=64)
    mapped = MappedSplit(pages.mapped(path), torch.arange(40), path)
    memory = TensorSplit(torch.from_numpy(values.copy()), torch.arange(40))
    gathered_in = []
    take = base.take_rows

    def recorded(*args: torch.Tensor) -> torch.Tensor:
        gathered_in.append(threading.current_thread().name)
        return take(*args)

    monkeypatch.setattr(base, "take_rows", recorded)
    first, second = (
        list(batches(split, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(2)))
        for split in (mapped, memory)
    )
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    assert len(first) == 7 and all(name.startswith("autoft-prefetch") for name in gathered_in[:7])
    assert not any(name.startswith("autoft-prefetch") for name in gathered_in[7:])  # memory: gathered in place
    stream = batches(mapped, batch_size=6, shuffle=True, generator=torch.Generator())
    next(stream)
    stream.close()  # a trial stopped mid-epoch: the prefetch thread ends with it
    assert not any(t.name.startswith("autoft-prefetch") for t in threading.enumerate())
