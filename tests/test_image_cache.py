"""The decoded-image cache on disk (tasks/image/cache.py): keyed, mapped, written then renamed, listed, cleared."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from autoft.cli import main
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.tasks.base import MappedSplit, pickled_by_path
from autoft.tasks.image import ImageTask, cache, data, decode, models
from autoft.trial import run_trial
from conftest import image_setup, make_image_folder


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache holds these images")


def test_second_load_maps_the_cache_instead_of_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    first = data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(decode, "decode_into", _no_decoding)
    second = data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.labels, second.val.labels)
    assert first.skipped == second.skipped == 1
    assert "decoded into the cache" in first.inputs and "mapped from the cache" in second.inputs
    assert len(cache.entries(tmp_path / "cache")) == 1


def test_changed_file_or_size_gives_a_new_entry(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    folder = tmp_path / "cache"
    data.load_images(root, image_size=8, cache_dir=folder)
    data.load_images(root, image_size=16, cache_dir=folder)  # another resolution
    image = next((root / "train" / "dog").iterdir())
    os.utime(image, ns=(0, 10**9))  # an edited file: new modification time
    data.load_images(root, image_size=8, cache_dir=folder)
    assert len(cache.entries(folder)) == 3


def test_half_written_entry_is_never_read(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    folder = tmp_path / "cache"
    data.load_images(root, image_size=8, cache_dir=folder)
    (entry,) = [p for p in folder.iterdir() if not p.name.startswith(".")]
    (entry / "meta.json").unlink()  # as if the writer died before its last file
    (entry / "train.images.npy").write_bytes(b"garbage")
    assert cache.load(folder, entry.name) is None
    assert cache.entries(folder) == []


def test_too_small_disk_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))
    with pytest.raises(AutoftError, match=r"needs .* GiB .* free"):
        data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_cache_list_and_clear_touch_only_entries(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    folder = tmp_path / "cache"
    data.load_images(root, image_size=8, cache_dir=folder)
    (folder / "notes").mkdir()  # not ours: clear leaves it
    assert main(["cache", "list", "--cache-dir", str(folder)]) == 0
    (entry,) = cache.entries(folder)
    assert entry["source"] == str(root.resolve()) and entry["images"] == 15
    assert entry["name"][:12] in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0
    assert [p.name for p in folder.iterdir()] == ["notes"]


def test_cache_command_defaults_to_the_folder_beside_the_default_run_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "list"]) == 0
    assert "runs/.autoft-cache: no cached images" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["cache", "list", "--cache-dir", "file"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cache_is_on_by_default_beside_the_run_dir_and_off_with_no_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(cache.ENV, raising=False)
    config = SearchConfig(model="test_resnet", data=tmp_path, task="image", run_dir=tmp_path / "runs" / "a")
    assert config.resolved().cache_dir == tmp_path / "runs" / ".autoft-cache"
    monkeypatch.setenv(cache.ENV, str(tmp_path / "shared"))  # --no-cache wins over the environment
    assert SearchConfig(model="test_resnet", data=tmp_path, task="image", cache=False).resolved().cache_dir is None
    with pytest.raises(AutoftError, match="--no-cache and --cache-dir"):
        SearchConfig(model="test_resnet", data=tmp_path, task="image", cache=False, cache_dir=tmp_path / "c")


def test_no_cache_and_cache_dir_on_the_command_line_exit_2(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    args = ["search", "--model", "test_resnet", "--data", str(root), "--no-cache", "--cache-dir", str(tmp_path)]
    assert main(args) == 2
    assert "contradict" in capsys.readouterr().err


def test_disk_is_checked_before_any_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))
    monkeypatch.setattr(decode, "decode_into", _no_decoding)
    with pytest.raises(AutoftError, match="--no-cache"):
        data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")


def test_interrupted_decoding_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_decoding_goes_straight_into_the_entry_file_in_chunks(tmp_path: Path, monkeypatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=5, layout="flat")
    (root / "dog" / "broken.png").write_bytes(b"")
    monkeypatch.setattr(decode, "CHUNK", 4)  # several chunks, one with the broken file
    reports: list[tuple[int, int]] = []
    with decode.reporting(lambda done, total: reports.append((done, total))):
        cached = data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    memory = data.load_images(root, image_size=8)
    assert reports == [(4, 16), (8, 16), (12, 16), (16, 16)]
    assert torch.equal(cached.train.images, memory.train.images) and torch.equal(cached.val.labels, memory.val.labels)
    (entry,) = cache.entries(tmp_path / "cache")
    assert entry["images"] == 15 and cached.skipped == 1  # the file holds the 15 readable images only
    assert entry["bytes"] < 16 * 3 * 8 * 8 + 4096


def _mapped_file(tensor: torch.Tensor) -> str:
    """The file whose mapping holds ``tensor``'s first byte ('' for anonymous memory), from /proc/self/maps."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) > 4 else ""
    return ""


def _trial(dataset: data.Dataset) -> list[float]:
    """Each epoch's val accuracy of one short trial of a tiny model (augmented: every batch goes through it)."""
    torch.manual_seed(0)
    model = models.create("test_resnet", num_classes=3, pretrained=False)
    recipe = Recipe.from_params({"epochs": 1, "batch_size": 8, "lr": 3e-3, "augment": "light", "weight_decay": 0.0})
    return [(e.val_loss, e.val_accuracy) for e in run_trial(image_setup(model, dataset), recipe, seed=3).history]


def test_past_the_memory_bound_the_splits_stay_mapped_with_the_same_batches_and_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder(tmp_path / "data", per_class=12, layout="flat")
    memory = data.load_images(root, image_size=16)
    monkeypatch.setenv("AUTOFT_DATA_MEMORY", "0.000001")  # ~1 KB: every subset is past it
    mapped = data.load_images(root, image_size=16, cache_dir=tmp_path / "cache")
    for split in ("train", "val"):
        images = getattr(mapped, split).images
        assert _mapped_file(images).endswith(f"all.seed0.val0.2.{split}.images.npy")  # a file, not memory
        assert torch.equal(images, getattr(memory, split).images)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    task = ImageTask()
    first, second = (list(task.batches(ds.train, batch_size=4, shuffle=True, generator=g))
                     for ds, g in zip((memory, mapped), gen, strict=True))  # fmt: skip
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    assert _trial(memory) == _trial(mapped)


def test_config_takes_the_cache_folder_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(cache.ENV, str(tmp_path / "shared"))
    config = SearchConfig(model="test_resnet", data=tmp_path, task="image")
    assert config.cache_dir == tmp_path / "shared"
    assert SearchConfig(model="test_resnet", data=tmp_path, task="image", cache_dir=tmp_path / "x").cache_dir == (
        tmp_path / "x"
    )


def test_the_cli_shows_a_decoding_bar_restarted_per_split() -> None:
    import io

    from rich.console import Console
    from rich.live import Live

    from autoft.cli.search import _Display

    out = io.StringIO()
    with Live("", console=Console(file=out, force_terminal=True, width=100), auto_refresh=False) as live:
        display = _Display(live, 3)
        for done, total in ((256, 600), (600, 600), (50, 100)):
            display.decoding(done, total)
        (task,) = display.bar.tasks
        assert (task.completed, task.total) == (50, 100)
        live.refresh()
    assert "decoding images" in out.getvalue() and "50/100" in out.getvalue()


def test_the_bound_holds_for_train_and_val_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=12, layout="flat")  # 36 images of 768 bytes at 16 px
    monkeypatch.setenv("AUTOFT_DATA_MEMORY", str(25_000 / 2**30))  # train (29 images) fits alone, not with val
    loaded = data.load_images(root, image_size=16, cache_dir=tmp_path / "cache")
    assert len(loaded.train) * 768 < 25_000 < (len(loaded.train) + len(loaded.val)) * 768
    assert all(_mapped_file(split.images).endswith(".images.npy") for split in (loaded.train, loaded.val))
    monkeypatch.setenv("AUTOFT_DATA_MEMORY", str(30_000 / 2**30))  # both fit: copied into memory
    loaded = data.load_images(root, image_size=16, cache_dir=tmp_path / "cache")
    assert not any(_mapped_file(split.images).endswith(".npy") for split in (loaded.train, loaded.val))


def test_a_mapped_split_pickles_as_its_path_only_when_asked(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=12)  # train/ and val/: both splits mapped from the entry
    train = data.load_images(root, image_size=16, cache_dir=tmp_path / "cache").train
    assert isinstance(train, MappedSplit)
    with pickled_by_path():
        small = pickle.dumps(train)
    whole = pickle.dumps(train)
    assert len(small) < train.images.numel() < len(whole)  # a path (and the labels), not the images
    again, copied = pickle.loads(small), pickle.loads(whole)
    assert _mapped_file(again.images).endswith("train.images.npy")
    assert not _mapped_file(copied.images).endswith(".npy")  # its own copy in memory
    for split in (again, copied):
        assert torch.equal(split.images, train.images) and torch.equal(split.labels, train.labels)
