"""Image data formats (formats.py): CSV/TSV manifests, Parquet as datasets writes it, CIFAR python and binary."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoft.cli import main
from autoft.config import detect_task
from autoft.errors import AutoftError
from autoft.tasks.image import cache
from autoft.tasks.image.data import load_images

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLORS = ((220, 40, 40), (40, 220, 40), (40, 40, 220))


def _png(color: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_manifest(root: Path, per_class: int = 4, *, name: str = "train.csv", sep: str = ",") -> Path:
    """``root/images/<class><i>.png`` and a manifest ``path<sep>label`` with paths relative to it."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = [f"path{sep}label"]
    for c, label in enumerate(("cat", "dog", "fish")):
        for i in range(per_class):
            (root / "images" / f"{label}{i}.png").write_bytes(_png(COLORS[c]))
            lines.append(f"images/{label}{i}.png{sep}{label}")
    manifest = root / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def make_parquet(path: Path, per_class: int = 4, *, names: bool = True) -> Path:
    """A parquet file laid out as ``datasets`` writes an image data set: image struct, int label, hf metadata."""
    images = [{"bytes": _png(COLORS[c]), "path": f"{c}_{i}.png"} for c in range(3) for i in range(per_class)]
    labels = [c for c in range(3) for _ in range(per_class)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, type=image_type), "label": pa.array(labels, type=pa.int64())})
    if names:
        features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "fish"], "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _cifar_pixels(labels: list[int]) -> np.ndarray:
    """CIFAR rows: 1024 red, 1024 green, 1024 blue bytes per image, the class's colour."""
    return np.stack([np.repeat(np.array(COLORS[c], dtype=np.uint8), 1024) for c in labels])


def make_cifar_python(root: Path, per_class: int = 4, *, protocol: int = 2) -> Path:
    """A CIFAR-10-style python folder: data_batch_1, test_batch, batches.meta (plain dicts + numpy arrays)."""
    root.mkdir(parents=True, exist_ok=True)
    labels = [c for c in range(3) for _ in range(per_class)]
    for name, rows in (("data_batch_1", labels), ("test_batch", labels[::2])):
        batch = {b"batch_label": b"x", b"labels": rows, b"data": _cifar_pixels(rows), b"filenames": [b"a"] * len(rows)}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [b"cat", b"dog", b"fish"], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


def make_cifar_binary(root: Path, per_class: int = 4, *, cifar100: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    labels = [c for c in range(3) for _ in range(per_class)]
    label_cols = [np.zeros((len(labels), 1), np.uint8)] if cifar100 else []  # coarse label first
    rows = np.hstack([*label_cols, np.array(labels, np.uint8)[:, None], _cifar_pixels(labels)])
    name = "train.bin" if cifar100 else "data_batch_1.bin"
    rows.tofile(root / name)
    (root / ("fine_label_names.txt" if cifar100 else "batches.meta.txt")).write_text("cat\ndog\nfish\n")
    return root


def _check(ds, *, test: int = 0) -> None:
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.train.images.shape[1:] == (3, 8, 8) and len(ds.train) + len(ds.val) == 12
    assert len(ds.test) == test if test else ds.test is None
    for split in (ds.train, ds.val):  # every image decoded to its class's colour
        for image, label in zip(split.images, split.labels, strict=True):
            assert tuple(image[:, 4, 4].tolist()) == COLORS[int(label)]


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("sep", [",", "\t"])
def test_manifest(tmp_path: Path, sep: str) -> None:
    manifest = make_manifest(tmp_path, name="train.tsv" if sep == "\t" else "labels.csv", sep=sep)
    assert detect_task(manifest) == "image"
    _check(load_images(manifest, image_size=8))


def test_manifest_folder_of_splits(tmp_path: Path) -> None:
    make_manifest(tmp_path, name="train.csv")
    make_manifest(tmp_path, per_class=1, name="test.csv")
    assert detect_task(tmp_path) == "image"
    _check(load_images(tmp_path, image_size=8), test=3)


def test_manifest_missing_image_is_counted_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = make_manifest(tmp_path)
    (tmp_path / "images" / "dog1.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = load_images(manifest, image_size=8)
    assert ds.skipped == 1 and len(ds.train) + len(ds.val) == 11
    assert "dog1.png" in caplog.text


def test_parquet_file_and_folder(tmp_path: Path) -> None:
    file = make_parquet(tmp_path / "one" / "train.parquet")
    _check(load_images(file, image_size=8))
    make_parquet(tmp_path / "hub" / "train-00000-of-00001.parquet")
    make_parquet(tmp_path / "hub" / "test-00000-of-00001.parquet", per_class=1)
    _check(load_images(tmp_path / "hub", image_size=8), test=3)


def test_parquet_without_class_names_uses_label_values(tmp_path: Path) -> None:
    ds = load_images(make_parquet(tmp_path / "train.parquet", names=False), image_size=8)
    assert ds.classes == ("0", "1", "2")


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_python_batches(tmp_path: Path, protocol: int) -> None:
    root = make_cifar_python(tmp_path / "cifar-10-batches-py", protocol=protocol)
    _check(load_images(root, image_size=8), test=6)
    assert load_images(root / "data_batch_1", image_size=8).classes == ("cat", "dog", "fish")


def test_cifar_pickle_as_numpy_1_wrote_it(tmp_path: Path) -> None:
    """The original batches name numpy.core.multiarray (numpy 1); numpy 2 writes numpy._core."""
    root = make_cifar_python(tmp_path, protocol=2)
    for name in ("data_batch_1", "test_batch"):
        blob = (root / name).read_bytes()
        assert b"numpy._core.multiarray" in blob
        (root / name).write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    _check(load_images(root, image_size=8), test=6)


@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_binary_batches(tmp_path: Path, cifar100: bool) -> None:
    _check(load_images(make_cifar_binary(tmp_path, cifar100=cifar100), image_size=8))


def test_cifar100_python_uses_fine_labels(tmp_path: Path) -> None:
    labels = [c for c in range(3) for _ in range(4)]
    batch = {b"fine_labels": labels, b"coarse_labels": [0] * 12, b"data": _cifar_pixels(labels)}
    (tmp_path / "train").write_bytes(pickle.dumps(batch, protocol=2))
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"cat", b"dog", b"fish"]}, protocol=2))
    _check(load_images(tmp_path, image_size=8))


# ----------------------------------------------------------------------------- bad input: one sentence, exit 2


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each case: the --data path and a phrase the one-sentence error must contain."""
    extra = make_manifest(tmp / "extra")
    extra.write_text(extra.read_text().replace("path,label", "path,label,species", 1).replace(",cat\n", ",cat,x\n"))
    floats = make_manifest(tmp / "floats")
    floats.write_text("path,label\n" + "".join(f"images/cat{i}.png,{i / 2}\n" for i in range(4)))
    evil = tmp / "evil"
    evil.mkdir()
    (evil / "data_batch_1").write_bytes(pickle.dumps({b"data": _Boom(), b"labels": [0]}, protocol=2))
    float_parquet = tmp / "fp" / "train.parquet"
    float_parquet.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([_png(COLORS[0])]), "label": pa.array([0.5])}), float_parquet)
    unnamed = make_manifest(tmp / "unnamed")
    unnamed.write_text(unnamed.read_text().replace("path,label", "file,label", 1))
    short = make_cifar_binary(tmp / "short")
    (short / "data_batch_1.bin").write_bytes((short / "data_batch_1.bin").read_bytes()[:-5])
    return {
        "manifest with two label columns": (extra, "line 1 has 3 column(s)"),
        "manifest label of floats": (floats, "line 2 column 2 (label)"),
        "manifest without a path column": (unnamed, "name the image column path"),
        "pickle that runs code": (evil / "data_batch_1", "posix.system"),
        "parquet label of floats": (float_parquet, "column 'label' holds double"),
        "truncated cifar binary": (short, "not a whole number"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "manifest with two label columns",
        "manifest label of floats",
        "manifest without a path column",
        "pickle that runs code",
        "parquet label of floats",
        "truncated cifar binary",
    ],
)
def test_bad_input_is_one_clear_error_and_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    data, phrase = _bad_inputs(tmp_path)[case]
    code = main(["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data),
                 "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "pwned" not in err
    assert phrase.lower() in " ".join(err.lower().split()), err


def test_pickle_refusal_never_calls_the_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Boom()}, protocol=2))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(AutoftError, match="not data"):
        load_images(tmp_path, image_size=8)
    assert calls == []


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_search_on_parquet(tmp_path: Path) -> None:
    import autoft

    data = make_parquet(tmp_path / "data" / "train.parquet", per_class=6)
    result = autoft.search("test_resnet", data, trials=1, image_size=16, pretrained=False, max_epochs=1,
                           run_dir=tmp_path / "run", warm_start=False, priors=False,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    assert result.model_dir.is_dir()
    assert len(cache.entries(tmp_path / "cache")) == 1  # the decoded images, kept for the next search
