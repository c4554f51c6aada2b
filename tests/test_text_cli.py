"""Bad text input through ``autoft.cli.main``: each one clear sentence and exit code 2; and (slow) a tiny text and
a tiny NER search end to end: study, best/config.json, reload, predict and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autoft
from autoft import figures, report, tasks
from autoft.cli import main
from autoft.cli.search import _Display
from autoft.controller import Progress
from textdata import sentences, tagged, write_conll, write_csv, write_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def _fails(capsys: pytest.CaptureFixture, tmp_path: Path, model: str | Path, data: Path, *extra: str) -> str:
    args = ["search", "--model", str(model), "--data", str(data), "--run-dir", str(tmp_path / "run"), "--trials", "1"]
    assert main([*args, *extra]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert message.startswith("error:") and message.count(". ") <= 1  # one sentence
    return message


def test_an_empty_file(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "empty.csv has no examples" in _fails(capsys, tmp_path, bert, tmp_path / "empty.csv")


def test_a_missing_column_names_the_columns_found(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_csv(tmp_path / "r.csv", sentences(6), header=("review_text", "label"))
    message = _fails(capsys, tmp_path, bert, data)
    assert "no text column" in message and "review_text, label" in message and "--text-column" in message
    assert "no column 'body'" in _fails(capsys, tmp_path, bert, data, "--text-column", "body")


def test_one_class(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_csv(tmp_path / "one.csv", [(text, "positive") for text, _ in sentences(6)])
    assert "at least 2 classes" in _fails(capsys, tmp_path, bert, data)


def test_labels_only_in_val(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "train.csv", sentences(6))
    write_csv(folder / "dev.csv", [*sentences(2), ("so so", "neutral")])
    message = _fails(capsys, tmp_path, bert, folder)
    assert "dev.csv has label(s) 'neutral' that no training example has" in message


def test_a_file_in_another_encoding_names_the_line(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "latin.csv"
    data.write_bytes("text,label\ngood,positive\ncaf\xe9 bad,negative\n".encode("latin-1"))
    assert "latin.csv:3 is not valid utf-8" in _fails(capsys, tmp_path, bert, data)


def test_a_malformed_conll_line(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_conll(tmp_path / "train.conll", tagged(3))
    lines = data.read_text().splitlines()
    lines[3] = "Paris"  # a token without a tag
    data.write_text("\n".join(lines))
    assert "train.conll:4 is not a CoNLL line" in _fails(capsys, tmp_path, bert, data)


def test_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = write_csv(tmp_path / "r.csv", sentences(6))
    assert "'no-such-org/no-such-model' is neither a directory nor" in _fails(
        capsys, tmp_path, "no-such-org/no-such-model", data
    )
    assert "does not exist" in _fails(capsys, tmp_path, "./no-such-dir", data)


def test_a_directory_without_a_tokenizer(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((bert / "config.json").read_text())
    data = write_csv(tmp_path / "r.csv", sentences(6))
    assert "has no tokenizer" in _fails(capsys, tmp_path, model, data)


class _Live:
    """What the display writes to: its status line updates."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def update(self, line: str) -> None:
        self.lines.append(line)


def test_each_task_names_its_score() -> None:
    assert [tasks.score_name(name) for name in ("image", "text", "ner", None)] == [
        "accuracy", "accuracy", "entity F1", "accuracy",
    ]  # fmt: skip


def test_progress_and_report_call_an_ner_score_entity_f1() -> None:
    live = _Live()
    _Display(live, 3, score_name=tasks.score_name("ner"))(Progress("epoch", 1, 2, 3, score=0.5, best=0.625))
    assert "val entity F1 0.5000" in live.lines[-1] and "acc" not in live.lines[-1]
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.625, params={}, distributions={}))
    summary = figures.summary_data(study, {"task": "ner"}, meta={"test_accuracy": 0.5}, counts=None)
    page = report._summary_html(summary)
    assert "Best validation entity F1" in page and "Test entity F1" in page and "accuracy" not in page
    curves = figures.curves_figure([{"number": 0, "state": "COMPLETE", "epochs": [0, 1], "values": [0.5, 0.6]}],
                                   score_name="entity F1")  # fmt: skip
    assert curves.layout.yaxis.title.text == "validation entity F1"


@pytest.mark.slow
def test_a_tiny_text_search_end_to_end(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "reviews"
    folder.mkdir()
    write_csv(folder / "train.csv", sentences(60, seed=0))
    write_csv(folder / "val.csv", sentences(16, seed=1))
    write_csv(folder / "test.csv", sentences(16, seed=2))
    run = tmp_path / "run"
    result = autoft.search(str(bert), folder, trials=4, max_epochs=3, run_dir=run, seed=0, timeout="4m")
    assert result.study.user_attrs["plan"]["data"]["inputs"].startswith("tokenized once: max_length")
    assert TrialState.COMPLETE in [t.state for t in result.study.trials]
    assert result.test_score is not None
    meta = json.loads((run / "best" / "config.json").read_text())
    assert meta["task"] == "text" and meta["classes"] == ["negative", "positive"]
    assert meta["tokenizer"] == str(bert.resolve()) and meta["max_length"] >= 8
    tuned = autoft.load_model(run / "best", device="cpu")
    assert set(tuned.predict(["great phone", "awful battery"])) <= {"negative", "positive"}
    assert main(["predict", str(run / "best"), "great phone", str(folder / "test.csv")]) == 0
    assert main(["evaluate", str(run / "best"), str(folder / "test.csv")]) == 0
    out = capsys.readouterr().out
    assert "great phone" in out and "accuracy" in out and "macro-F1" in out
    report = (run / "report.html").read_text()
    assert "Most confidently wrong on test" in report  # the data has a test split: the best model is shown on it


@pytest.mark.slow
def test_a_tiny_ner_search_end_to_end(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_conll(tmp_path / "ner.conll", tagged(60))
    run = tmp_path / "run"
    assert main(["search", "--model", str(bert), "--data", str(data), "--run-dir", str(run), "--trials", "3",
                 "--max-epochs", "3", "--timeout", "4m"]) == 0  # fmt: skip
    summary = " ".join(capsys.readouterr().err.split())
    assert "val entity F1" in summary and "val acc" not in summary and "val accuracy" not in summary
    meta = json.loads((run / "best" / "config.json").read_text())
    assert meta["task"] == "ner" and meta["classes"] == ["O", "B-LOC", "B-PER"]
    tuned = autoft.load_model(run / "best", device="cpu")
    found = tuned.predict(["john lives in paris"])
    assert len(found) == 1 and all({"type", "text", "start", "end"} <= set(e) for e in found[0])
    assert main(["evaluate", str(run / "best"), str(data)]) == 0
    assert "entity F1" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert "<mark" in page  # entities highlighted in the gallery
    assert "Best validation entity F1" in page and "Best validation accuracy" not in page


@pytest.mark.slow
@pytest.mark.parametrize("task", ["text", "ner"])
def test_a_text_search_soups_its_kept_models_and_the_soup_loads(bert: Path, tmp_path: Path, task: str) -> None:
    """--keep-top 3 on a text task: the greedy soup weighs the kept fine-tunes on val (the same model, the same
    pretrained start), and whichever ``best/`` ends up holding loads and predicts."""
    if task == "ner":
        data = write_conll(tmp_path / "ner.conll", tagged(60))
    else:
        data = tmp_path / "reviews"
        data.mkdir()
        write_csv(data / "train.csv", sentences(60, seed=0))
        write_csv(data / "val.csv", sentences(16, seed=1))
    options = {"trials": 3, "max_epochs": 2, "keep_top": 3, "seed": 0, "run_dir": tmp_path / "run", "priors": False}
    result = autoft.search(str(bert), data, task=task, **options)  # the text preset: its portfolio first
    assert result.final is not None and "needs at least 2 kept models" not in result.final.reason
    tuned = autoft.load_model(result.model_dir, device="cpu")
    assert len(tuned.predict(["john lives in paris"])) == 1
    if result.final.kind == "soup":  # the single best trial's model is kept beside it, loadable
        single = tmp_path / "run" / "top" / f"trial-{result.final.trials[0]:04d}"
        assert autoft.load_model(single, device="cpu").meta["trial"] == result.final.trials[0]
