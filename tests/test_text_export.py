"""Exporting text models (sentence classification, sentence pairs, NER) to ONNX and TorchScript: token ids and
attention mask in, logits out, any batch size and length, the same logits as the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoft import AutoftError, load_model, tasks
from autoft.cli import main
from autoft.export import export_model, save_model
from autoft.tasks.base import LoadedModel
from autoft.tasks.text import models, tokens
from textdata import write_tiny_bert

CLASSES = {"text": ["negative", "neutral", "positive"], "ner": ["O", "B-LOC", "I-LOC", "B-PER"]}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def _tuned_dir(bert: Path, folder: Path, task_name: str, *, pairs: bool = False) -> Path:
    """A ``best/`` folder as a search writes it: random tiny-BERT weights with a new head and the task's meta."""
    task = tasks.get(task_name)
    torch.manual_seed(0)
    model = models.create(str(bert), token_level=task.token_level, num_classes=len(CLASSES[task_name]))
    spec = task.input_spec(model, None)
    meta = {"model": str(bert), "task": task_name, "classes": CLASSES[task_name], "trial": 0, "max_length": 16}
    meta |= task.export_meta(spec) | ({"sentence_pairs": pairs} if task_name == "text" else {})
    return save_model(folder, model.state_dict(), meta)


def _inputs(tuned: LoadedModel, sentences: list) -> dict[str, torch.Tensor]:
    split = tuned.encode(sentences)
    return tokens.model_inputs(split, slice(None))


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["text", "ner"])
def test_onnx_file_gives_the_model_s_logits_at_any_batch_size_and_length(
    bert: Path, tmp_path: Path, task_name: str
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    tuned_dir = _tuned_dir(bert, tmp_path / "best", task_name)
    path, difference = export_model(tuned_dir, format="onnx")
    assert path == tuned_dir / "model.onnx" and difference < 1e-4
    tuned = load_model(tuned_dir, device="cpu")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["autoft"])
    assert meta["classes"] == CLASSES[task_name] and meta["task"] == task_name and meta["max_length"] == 16
    for sentences in (["john lives in paris"], ["the phone is great", "mary visited rome", "bad", "a b c d e f g h"]):
        inputs = _inputs(tuned, sentences)
        with torch.inference_mode():
            expected = tuned.model(inputs)
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
        assert got.shape == expected.shape  # (N, classes), or (N, T, tags) for NER
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_of_a_sentence_pair_model_takes_token_type_ids(bert: Path, tmp_path: Path) -> None:
    tuned_dir = _tuned_dir(bert, tmp_path / "best", "text", pairs=True)
    path, difference = export_model(tuned_dir, format="torchscript", output=tmp_path / "pairs.pt")
    assert difference < 1e-4
    tuned = load_model(tuned_dir, device="cpu")
    inputs = _inputs(tuned, [("great phone", "the battery is bad"), ("awful", "nice screen and a very good day")])
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    with torch.inference_mode():
        expected = tuned.model(inputs)
        got = torch.jit.load(str(path))(*inputs.values())
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cli_export_checks_on_the_given_sentences(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tuned_dir = _tuned_dir(bert, tmp_path / "best", "text")
    lines = tmp_path / "lines.txt"
    lines.write_text("the screen is lovely\nbroken after a day and the battery was really very poor\n")
    assert main(["export", str(tuned_dir), "--format", "torchscript", "--check", "nice phone", str(lines)]) == 0
    assert "max abs difference" in " ".join(capsys.readouterr().err.split())  # the CLI's console is stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["export", str(tuned_dir), "--format", "torchscript", "--check", str(empty)]) == 2
    assert "hold no text" in capsys.readouterr().err


def test_a_task_without_a_deployable_form_is_refused() -> None:
    loaded = LoadedModel(torch.nn.Linear(2, 2), ("a", "b"), {"task": "vectors"}, torch.device("cpu"))
    with pytest.raises(AutoftError, match="Exporting a vectors model"):
        loaded.deployable()
