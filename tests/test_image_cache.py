"""The decoded-image cache on disk (tasks/image/cache.py): keyed, mapped, written then renamed, listed, cleared."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from autoft.cli import main
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.tasks.image import cache, data, decode
from conftest import make_image_folder


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache holds these images")


def test_second_load_maps_the_cache_instead_of_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    first = data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(decode, "decode_all", _no_decoding)
    second = data.load_images(root, image_size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.labels, second.val.labels)
    assert first.skipped == second.skipped == 1
    assert "decoded images in the cache" in first.inputs and "mapped from the cache" in second.inputs
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


def test_cache_command_without_a_folder_exits_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv(cache.ENV, raising=False)
    assert main(["cache", "list"]) == 2
    assert "--cache-dir" in capsys.readouterr().err


def test_config_takes_the_cache_folder_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(cache.ENV, str(tmp_path / "shared"))
    config = SearchConfig(model="test_resnet", data=tmp_path, task="image")
    assert config.cache_dir == tmp_path / "shared"
    assert SearchConfig(model="test_resnet", data=tmp_path, task="image", cache_dir=tmp_path / "x").cache_dir == (
        tmp_path / "x"
    )
