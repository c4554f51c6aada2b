"""The exported model: written atomically, loaded back exactly, inconsistent files refused."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from autoft import AutoftError, load_model
from autoft.export import save_model, update_config
from autoft.tasks.image.models import create


def _export(directory: Path, trial: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("test_resnet", num_classes=3, pretrained=False).eval()
    meta = {"model": "test_resnet", "classes": ["a", "b", "c"], "image_size": 16, "mean": [0.5] * 3,
            "std": [0.5] * 3, "interpolation": "bilinear", "trial": trial}  # fmt: skip
    save_model(directory, model.state_dict(), meta)
    return model


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = _export(tmp_path / "best")
    tuned = load_model(tmp_path / "best", device="cpu")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    expected = model((images.float() / 255 - 0.5) / 0.5).softmax(1)
    assert torch.allclose(tuned.predict_proba(images), expected, atol=1e-5)
    assert set(tuned.predict(images)) <= {"a", "b", "c"}
    assert not list((tmp_path / "best").glob(".*tmp*"))  # no temporary files left behind


def test_update_config_adds_fields(tmp_path: Path) -> None:
    _export(tmp_path / "best")
    update_config(tmp_path / "best", test_accuracy=0.75)
    assert json.loads((tmp_path / "best" / "config.json").read_text())["test_accuracy"] == 0.75


def test_weights_and_config_of_different_trials_are_refused(tmp_path: Path) -> None:
    _export(tmp_path / "best", trial=4)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    (tmp_path / "best" / "config.json").write_text(json.dumps(config | {"trial": 7}))
    with pytest.raises(AutoftError, match="trial 4"):
        load_model(tmp_path / "best")


def test_a_folder_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AutoftError, match="not an exported model"):
        load_model(tmp_path)


def test_exported_files_get_the_mode_new_files_get(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _export(tmp_path / "best")
        (tmp_path / "neighbour").write_text("")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "best").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}  # safetensors alone would write 0600
    assert stat.S_IMODE((tmp_path / "neighbour").stat().st_mode) == 0o644
    old = os.umask(0o077)
    try:
        _export(tmp_path / "private")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "private").iterdir()} == {0o600}
