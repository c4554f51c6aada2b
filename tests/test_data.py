"""Tests for autoft.data: image folders, splits, decoding, batches, augmentation, normalization."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoft.errors import AutoftError
from autoft.recipe import AUGMENT_LEVELS
from autoft.tasks.base import batches
from autoft.tasks.image.data import Dataset, ImageSet, load_image_folder
from autoft.tasks.image.transforms import augment, normalize
from conftest import CLASS_COLORS, make_image_folder


def _class_of(images: torch.Tensor) -> list[int]:
    """The CLASS_COLORS index nearest to each image's mean colour."""
    means = images.float().mean(dim=(2, 3))
    colors = torch.tensor(CLASS_COLORS, dtype=torch.float32)
    return torch.cdist(means, colors).argmin(dim=1).tolist()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- layouts


def test_split_layout_shapes_labels_and_summary(image_folder: Path) -> None:
    ds = load_image_folder(image_folder, image_size=16)
    assert isinstance(ds, Dataset)
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.summary() == {"classes": 3, "train": 30, "val": 6, "test": 0, "image_size": 16, "skipped": 0}
    for split in (ds.train, ds.val):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 16, 16)
        assert split.images.is_contiguous()
        assert split.labels.dtype == torch.int64 and len(split) == split.images.shape[0]
        assert _class_of(split.images) == split.labels.tolist()
    assert ds.test is None
    assert ds.root == image_folder.resolve() and ds.image_size == 16


def test_split_layout_with_test_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=8)
    make_image_folder(tmp_path / "t", classes=("a", "b"), per_class=3, layout="flat")
    shutil.move(tmp_path / "t", root / "test")
    ds = load_image_folder(root, image_size=8)
    assert ds.test is not None and len(ds.test) == 6
    assert ds.summary()["test"] == 6
    assert _class_of(ds.test.images) == ds.test.labels.tolist()


def test_flat_layout_stratified_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=10, layout="flat")
    ds = load_image_folder(root, image_size=8, val_fraction=0.2, seed=1)
    assert ds.test is None
    assert torch.bincount(ds.val.labels).tolist() == [2, 2, 2]
    assert torch.bincount(ds.train.labels).tolist() == [8, 8, 8]
    assert _class_of(ds.train.images) == ds.train.labels.tolist()
    assert _class_of(ds.val.images) == ds.val.labels.tolist()


def test_split_is_deterministic_per_seed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=12, layout="flat")
    a = load_image_folder(root, image_size=8, seed=3)
    b = load_image_folder(root, image_size=8, seed=3)
    c = load_image_folder(root, image_size=8, seed=4)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)


def test_train_without_val_is_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=10)
    shutil.rmtree(root / "val")
    ds = load_image_folder(root, image_size=8, val_fraction=0.3)
    assert torch.bincount(ds.val.labels).tolist() == [3, 3]
    assert torch.bincount(ds.train.labels).tolist() == [7, 7]


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_every_class_keeps_one_train_and_one_val(tmp_path: Path, fraction: float) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, layout="flat")
    ds = load_image_folder(root, image_size=8, val_fraction=fraction)
    assert torch.bincount(ds.train.labels).tolist() == [1, 1]
    assert torch.bincount(ds.val.labels).tolist() == [1, 1]


def test_class_order_is_sorted_and_val_uses_train_order(tmp_path: Path) -> None:
    # Given order decides the colours; the loader must sort names and label by the sorted order.
    root = make_image_folder(tmp_path / "d", classes=("zebra", "ant", "Moose"), per_class=4)
    ds = load_image_folder(root, image_size=8)
    assert ds.classes == ("Moose", "ant", "zebra")
    colour_of = {"zebra": 0, "ant": 1, "Moose": 2}
    expected = [colour_of[ds.classes[i]] for i in ds.val.labels.tolist()]
    assert _class_of(ds.val.images) == expected


# ----------------------------------------------------------------------------- decoding


def test_resize_shorter_side_then_center_crop(tmp_path: Path) -> None:
    # 60x20: left third red, middle green, right blue -> shorter side 20, center 20x20 crop is green.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20, 0] = pixels[:, 20:40, 1] = pixels[:, 40:, 2] = 255
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(pixels).save(tmp_path / name / f"{k}.png")
    ds = load_image_folder(tmp_path, image_size=10, interpolation="nearest")
    assert ds.train.images.shape == (2, 3, 10, 10)
    assert (ds.train.images[:, 1] == 255).all() and (ds.train.images[:, [0, 2]] == 0).all()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_interpolations_upscale(tmp_path: Path, interpolation: str) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=(9, 12))
    ds = load_image_folder(root, image_size=32, interpolation=interpolation)
    assert ds.train.images.shape == (4, 3, 32, 32)


def test_odd_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    folder = root / "train" / "a"
    Image.new("L", (20, 24), 100).save(folder / "gray.png")
    Image.new("RGBA", (20, 24), (10, 20, 30, 128)).save(folder / "rgba.png")
    Image.new("RGB", (20, 24), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "pal.gif")
    Image.fromarray(np.full((24, 20), 128 * 257, dtype=np.uint16)).save(folder / "deep.png")
    with Image.open(folder / "deep.png") as deep:
        assert deep.mode.startswith("I")
    Image.new("RGB", (20, 24), (5, 6, 7)).save(folder / "photo.JPG", quality=95)
    ds = load_image_folder(root, image_size=8)
    assert ds.skipped == 0 and len(ds.train) == 9
    by_file = dict(zip(sorted(p.name for p in folder.iterdir()), ds.train.images[:7], strict=True))
    assert by_file["gray.png"].unique().tolist() == [100]
    assert by_file["rgba.png"][:, 0, 0].tolist() == [10, 20, 30]
    assert by_file["pal.gif"][0].float().mean() > 150
    assert by_file["deep.png"].unique().tolist() == [128]  # 16-bit scaled, not clipped to white
    assert (by_file["photo.JPG"][:, 0, 0].int() - torch.tensor([5, 6, 7])).abs().max() <= 3


def test_non_images_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("hi")
    ds = load_image_folder(root, image_size=8)
    assert ds.classes == ("a", "b") and len(ds.train) == 6 and ds.skipped == 0


def test_corrupt_zero_byte_and_truncated_files_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=4)
    folder = root / "train" / "a"
    (folder / "zero.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    full = _png_bytes(Image.new("RGB", (40, 40), (1, 2, 3)).effect_spread(5))
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING, logger="autoft.data"):
        ds = load_image_folder(root, image_size=8)
    assert ds.skipped == 3 and ds.summary()["skipped"] == 3
    assert len(ds.train) == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 3" in warnings[0].getMessage() and "zero.png" in warnings[0].getMessage()


def test_class_emptied_by_corrupt_files_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    for p in (root / "val" / "b").iterdir():
        p.write_bytes(b"broken")
    with pytest.raises(AutoftError, match=r"val/b has no readable images"):
        load_image_folder(root, image_size=8)


def test_flat_class_left_with_one_readable_image_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, layout="flat")
    (root / "b" / "img_000.png").write_bytes(b"")
    with pytest.raises(AutoftError, match=r"only 1 readable image"):
        load_image_folder(root, image_size=8)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(AutoftError, match=r"nope does not exist"):
        load_image_folder(tmp_path / "nope", image_size=8)


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(AutoftError, match=r"x\.zip is a file"):
        load_image_folder(tmp_path / "x.zip", image_size=8)


def test_no_class_folders(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(AutoftError, match=r"has no class folders"):
        load_image_folder(tmp_path, image_size=8)


def test_class_folder_without_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, layout="flat")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("x")
    with pytest.raises(AutoftError, match=r"empty_class has no images"):
        load_image_folder(root, image_size=8)


def test_only_one_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("solo",), per_class=3, layout="flat")
    with pytest.raises(AutoftError, match=r"only one class folder \('solo'\)"):
        load_image_folder(root, image_size=8)


def test_val_class_set_differs(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=4)
    shutil.rmtree(root / "val" / "c")
    make_image_folder(root / "extra", classes=("z",), per_class=1, layout="flat")
    shutil.move(root / "extra" / "z", root / "val" / "z")
    with pytest.raises(AutoftError) as err:
        load_image_folder(root, image_size=8)
    msg = str(err.value)
    assert "missing in val/: ['c']" in msg and "missing in train/: ['z']" in msg


def test_test_class_set_differs(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=4)
    make_image_folder(root / "test", classes=("a",), per_class=1, layout="flat")
    with pytest.raises(AutoftError, match=r"missing in test/: \['b'\]"):
        load_image_folder(root, image_size=8)


def test_val_without_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d" / "val", classes=("a", "b"), per_class=1, layout="flat")
    with pytest.raises(AutoftError, match=r"no train/"):
        load_image_folder(tmp_path / "d", image_size=8)


@pytest.mark.parametrize("fraction", [0, 0.0, 1.0, 1.5, -0.1, True, "0.2"])
def test_bad_val_fraction(image_folder: Path, fraction: object) -> None:
    with pytest.raises(AutoftError, match=r"val_fraction must be .* but got"):
        load_image_folder(image_folder, image_size=8, val_fraction=fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [4, 0, 16.0, "32", True])
def test_bad_image_size(image_folder: Path, size: object) -> None:
    with pytest.raises(AutoftError, match=r"image_size must be an integer of at least 8"):
        load_image_folder(image_folder, image_size=size)  # type: ignore[arg-type]


def test_bad_interpolation(image_folder: Path) -> None:
    with pytest.raises(AutoftError, match=r"'bicubc'.*bicubic, bilinear, nearest.*did you mean 'bicubic'"):
        load_image_folder(image_folder, image_size=8, interpolation="bicubc")


# ----------------------------------------------------------------------------- batches


def _numbered(n: int, size: int = 8) -> ImageSet:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return ImageSet(images, torch.arange(n))


def test_batches_cover_every_index_once_when_shuffled() -> None:
    split = _numbered(23)
    out = list(batches(split, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in out] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in out])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for x, y in out:  # images travel with their labels
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_batches_shuffle_is_deterministic_per_generator_seed() -> None:
    split = _numbered(30)

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in batches(split, batch_size=7, shuffle=True, generator=gen)]).tolist()

    assert order(1) == order(1) and order(1) != order(2)


def test_batches_in_order_and_drop_last() -> None:
    split = _numbered(10)
    ordered = list(batches(split, batch_size=4, shuffle=False))
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))
    dropped = list(batches(split, batch_size=4, shuffle=False, drop_last=True))
    assert [len(y) for _, y in dropped] == [4, 4]
    gen = torch.Generator().manual_seed(0)
    assert [len(y) for _, y in batches(split, batch_size=4, shuffle=True, generator=gen, drop_last=True)] == [
        4,
        4,
    ]


def test_batches_rejects_bad_batch_size() -> None:
    with pytest.raises(AutoftError, match=r"batch_size must be a positive integer, but got 0"):
        next(batches(_numbered(3), batch_size=0, shuffle=False))


# ----------------------------------------------------------------------------- augment / normalize


def _random_batch(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


def test_augment_none_is_identity() -> None:
    x = _random_batch()
    assert augment(x, "none", generator=torch.Generator()) is x


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augment_keeps_shape_dtype_and_is_deterministic(level: str) -> None:
    x = _random_batch()
    a = augment(x, level, generator=torch.Generator().manual_seed(0))
    b = augment(x, level, generator=torch.Generator().manual_seed(0))
    c = augment(x, level, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_augment_strong_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    augment(_random_batch(), "strong", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_augment_light_flip_and_crop_preserve_content() -> None:
    # A constant image stays constant under any flip and crop.
    x = torch.full((3, 3, 12, 12), 77, dtype=torch.uint8)
    assert (augment(x, "light", generator=torch.Generator().manual_seed(0)) == 77).all()


def test_augment_unknown_level_lists_valid_levels() -> None:
    with pytest.raises(AutoftError, match=r"'strnog'.*none, light, strong.*did you mean 'strong'"):
        augment(_random_batch(), "strnog", generator=torch.Generator())
    assert AUGMENT_LEVELS == ("none", "light", "strong")


def test_normalize_values() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    mean, std = (0.5, 0.4, 0.2), (0.5, 0.2, 0.1)
    out = normalize(x, mean=mean, std=std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 3.0, 0.0]))


def test_normalize_rejects_bad_stats() -> None:
    with pytest.raises(AutoftError, match=r"three values each"):
        normalize(_random_batch(), mean=(0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_decode_into_packs_readable_images_in_order_past_failures() -> None:
    from autoft.tasks.image import decode

    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(600)]  # > decode.CHUNK: two windows
    broken = {0, 5, 6, 299, 300, 599}
    items = [b"broken" if i in broken else _png_bytes(Image.fromarray(p)) for i, p in enumerate(pictures)]
    out = np.full((len(items), 3, 12, 12), 7, dtype=np.uint8)
    failed = decode.decode_into(items, out, 12, Image.Resampling.BICUBIC)
    assert failed == sorted(broken)
    kept = [p.transpose(2, 0, 1) for i, p in enumerate(pictures) if i not in broken]
    assert np.array_equal(out[: len(kept)], np.stack(kept))  # in order, no gaps, each image its own row
