"""Using a tuned model: predict (files, folders, globs), evaluate a split folder, export to ONNX / TorchScript."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx.external_data_helper import uses_external_data

from autoft import AutoftError, export, load_model
from autoft.cli import main
from autoft.export import evaluate_folder, export_model, predict_files, save_model
from autoft.tasks.image.data import find_images
from autoft.tasks.image.models import create
from conftest import make_image_folder


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported model (test_resnet, 3 classes, 16 px) as a search leaves it in best/."""
    directory = tmp_path_factory.mktemp("model") / "best"
    torch.manual_seed(0)
    model = create("test_resnet", num_classes=3, pretrained=False).eval()
    meta = {"model": "test_resnet", "classes": ["cat", "dog", "fish"], "image_size": 16, "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "trial": 0}  # fmt: skip
    return save_model(directory, model.state_dict(), meta)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4, size=(16, 16), with_test=True)


def test_find_images_takes_files_folders_and_globs(images: Path) -> None:
    one = images / "test" / "cat" / "img_000.png"
    found = find_images([one, images / "test" / "dog", str(images / "test" / "*" / "img_000.png")])
    assert [f.parent.name for f in found] == ["cat", "dog", "fish"]  # the repeated cat image is listed once
    with pytest.raises(AutoftError, match="not an image file, a folder or a glob"):
        find_images([images / "nothing*.png"])


def test_predict_gives_top_k_sorted_probabilities_that_match_the_model(tuned_dir: Path, images: Path) -> None:
    tuned = load_model(tuned_dir, device="cpu")
    files = find_images([images / "val"])
    done: list[int] = []
    rows = predict_files(tuned, files, top_k=2, batch_size=2, progress=done.append)
    assert done == [2, 1]  # 3 images in batches of 2
    full = tuned.predict_proba(files)
    for row, p in zip(rows, full, strict=True):
        assert len(row.classes) == 2 and row.probabilities[0] >= row.probabilities[1]
        assert row.classes[0] == tuned.classes[int(p.argmax())]
        assert row.probabilities[0] == pytest.approx(p.max().item(), abs=1e-5)


def test_evaluate_matches_predictions_on_the_folder(tuned_dir: Path, images: Path) -> None:
    tuned = load_model(tuned_dir, device="cpu")
    result = evaluate_folder(tuned, images / "test", batch_size=4)
    files = find_images([images / "test"])
    truth = [f.parent.name for f in files]
    predicted = tuned.predict(files)
    assert result.count == 3 == sum(map(sum, result.confusion))
    assert result.accuracy == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    for i, name in enumerate(tuned.classes):
        assert result.confusion[i][tuned.classes.index(predicted[truth.index(name)])] >= 1
    with pytest.raises(AutoftError, match="one sub-folder per class"):
        evaluate_folder(tuned, images)  # train/ val/ test/ are no classes


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_exported_file_gives_the_model_s_outputs(tuned_dir: Path, tmp_path: Path, format: str) -> None:
    path, difference = export_model(tuned_dir, format=format, output=tmp_path / f"model.{format}")
    assert difference < 1e-4
    tuned = load_model(tuned_dir, device="cpu")
    batch = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    expected = tuned.logits(batch)
    if format == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": batch.float().numpy()})[0])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["autoft"])
    else:
        extra = {"config.json": ""}
        got = torch.jit.load(str(path), _extra_files=extra)(batch.float()).detach()
        meta = json.loads(extra["config.json"])
    assert torch.allclose(got, expected, atol=1e-4)
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["image_size"] == 16
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, every weight in it: no stray .data


@pytest.mark.slow
def test_onnx_past_the_single_file_limit_is_the_external_data_pair(
    tuned_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "_ONNX_SINGLE_FILE_BYTES", 0)  # as if the model were over protobuf's 2 GiB
    path, difference = export_model(tuned_dir, format="onnx", output=tmp_path / "model.onnx")
    assert difference < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    assert any(uses_external_data(t) for t in proto.graph.initializer)  # the .data file is the one it reads
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert "autoft" in session.get_modelmeta().custom_metadata_map
    monkeypatch.setattr(export, "_ONNX_SINGLE_FILE_BYTES", 1 << 30)
    export_model(tuned_dir, format="onnx", output=path)  # exported again as one file: the old .data goes
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cli_predict_evaluate_and_bad_input(
    tuned_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tuned_dir), str(images / "test"), "--top-k", "3", "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    columns = {"path", *(f"{c}{i}" for i in (1, 2, 3) for c in ("class", "probability"))}
    assert len(rows) == 3 and set(rows[0]) == columns
    assert sum(float(r[f"probability{i}"]) for r in rows[:1] for i in (1, 2, 3)) == pytest.approx(1, abs=1e-4)
    capsys.readouterr()
    assert main(["evaluate", str(tuned_dir), str(images / "test"), "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", str(tuned_dir), str(tmp_path / "missing.png")]) == 2
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "not an exported model" in capsys.readouterr().err
