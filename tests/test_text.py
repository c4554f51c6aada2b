"""Tests for the text tasks (autoft.tasks.text): the model protocol over a tiny random BERT, tokenizing once,
dynamic padding, NER label alignment and scoring, and head-only trials on cached features equal the uncached
(partial trials on the prefix cache: tests/test_text_prefix.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoft import blocks, features, optim, tasks
from autoft.config import SearchConfig
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.tasks.text import entities, tokens
from autoft.trial import predict_logits, run_trial
from test_features import _assert_same_outcome
from textdata import sentences, tagged, write_conll, write_csv, write_tiny_bert


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def text_setup(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    data = write_csv(tmp_path_factory.mktemp("text") / "reviews.csv", sentences(40))
    return prepare(SearchConfig(model=str(bert), data=data, device="cpu"))


@pytest.fixture(scope="module")
def ner_setup(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    data = write_conll(tmp_path_factory.mktemp("ner") / "train.conll", tagged(30))
    return prepare(SearchConfig(model=str(bert), data=data, device="cpu"))


def test_the_data_decides_the_task(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "a.csv", sentences(4))
    conll = write_conll(tmp_path / "b.conll", tagged(2))
    assert SearchConfig(model="m", data=csv).task == "text"
    assert SearchConfig(model="m", data=conll).task == "ner"
    assert SearchConfig(model="m", data=tmp_path / "images").task == "image"
    assert SearchConfig(model="m", data=csv, task="ner").task == "ner"  # --task wins


def test_block_groups_are_the_embeddings_then_each_layer(text_setup: Setup) -> None:
    model = text_setup.base_model
    groups = blocks.block_groups(model)
    assert [g[0].split(".")[1:4] for g in groups] == [
        ["embeddings", "word_embeddings", "weight"],
        ["encoder", "layer", "0"],
        ["encoder", "layer", "1"],
    ]
    assert blocks.head_parameter_names(model) == {"head.weight", "head.bias"}


def test_partial_freezing_and_layer_decay_work_unchanged(text_setup: Setup) -> None:
    import copy

    model = copy.deepcopy(text_setup.base_model)
    blocks.apply_freeze(model, train_blocks=1)
    trainable = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    assert trainable == {"1"}  # the last encoder layer only (and the head)
    blocks.apply_freeze(model, train_blocks=None)
    scales = sorted({g["lr_scale"] for g in optim.param_groups(model, Recipe(layer_decay=0.5, head_lr_ratio=10))})
    assert scales == [0.125, 0.25, 0.5, 10.0]  # embeddings, layer 0, layer 1, head


def test_outputs_are_per_sentence_for_text_and_per_token_for_ner(text_setup: Setup, ner_setup: Setup) -> None:
    for setup, classes in ((text_setup, 2), (ner_setup, 3)):
        inputs, labels = next(iter(setup.task.batches(setup.dataset.val, batch_size=4, shuffle=False)))
        logits = setup.base_model.eval()(inputs)
        assert logits.shape == (*labels.shape, classes)


@pytest.mark.parametrize("kind", ["text", "ner"])
def test_evaluation_runs_by_length_and_gives_the_logits_in_the_splits_order(
    text_setup: Setup, ner_setup: Setup, kind: str
) -> None:
    setup = text_setup if kind == "text" else ner_setup
    model, val = setup.base_model.eval(), setup.dataset.val
    ordered = list(features.model_inputs(setup.task, val, setup.spec, device=setup.device, batch_size=4))
    widths = [inputs["input_ids"].shape[1] for _, inputs in ordered]
    assert widths == sorted(widths) and widths[0] < val.max_length  # short examples together: narrow batches
    assert sorted(torch.cat([rows for rows, _ in ordered]).tolist()) == list(range(len(val)))
    logits = predict_logits(model, val, setup.task, setup.spec, device=setup.device, batch_size=4)
    with torch.no_grad():  # one example at a time, in stored order, as wide as it is
        alone = [model(tokens.model_inputs(val, slice(i, i + 1)))[0] for i in range(len(val))]
    for row, expected in zip(logits, alone, strict=True):  # NER: its tokens' logits; past them, unscored padding
        torch.testing.assert_close(row[: len(expected)], expected, rtol=1e-4, atol=1e-5)


def test_the_probe_times_evaluation_on_a_batch_of_middle_length(text_setup: Setup, monkeypatch) -> None:
    """Evaluation batches sentences by length, so its cost is timed on the middle batch of that order, not on the
    first val rows padded to their longest."""
    from autoft import step_cost

    monkeypatch.setattr(step_cost, "fastest", lambda run, device, repeats: 1.0)
    eval_inputs = text_setup.task.eval_inputs
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(
        type(text_setup.task), "eval_inputs", lambda self, inputs, spec, device: seen.append(inputs["input_ids"])
        or eval_inputs(inputs, spec, device=device),
    )  # fmt: skip
    step_cost.eval_seconds_per_image(text_setup, batch_size=4)
    val = text_setup.dataset.val
    order = text_setup.task.eval_order(val)
    middle = order[(len(order) - 4) // 2 :][:4]
    width = int(val.lengths[middle].max())  # dynamic padding: as wide as its longest
    assert not torch.equal(middle, torch.arange(4))  # the test data's first rows are not the middle ones
    assert torch.equal(seen[0], val.input_ids[middle][:, :width])


def test_tokenized_once_with_max_length_from_the_data_and_dynamic_padding(text_setup: Setup) -> None:
    train = text_setup.dataset.train
    assert train.max_length == tokens.choose_max_length(train.lengths.tolist(), limit=64)
    assert "max_length" in text_setup.dataset.inputs
    widths = {b[0]["input_ids"].shape[1] for b in text_setup.task.batches(train, batch_size=2, shuffle=False)}
    assert len(widths) > 1 and max(widths) <= train.max_length  # each batch as wide as its longest sentence
    inputs, _ = next(iter(text_setup.task.batches(train, batch_size=2, shuffle=False)))
    assert inputs["attention_mask"].sum(1).tolist() == train.lengths[:2].tolist()


def test_max_length_is_the_98th_percentile_capped_by_the_model() -> None:
    assert tokens.choose_max_length([10] * 98 + [400, 500], limit=512) == 10
    assert tokens.choose_max_length([600] * 10, limit=512) == 512
    assert tokens.choose_max_length([2, 3], limit=512) == tokens.MIN_LENGTH


def test_ner_labels_score_the_first_sub_token_only(ner_setup: Setup) -> None:
    val = ner_setup.dataset.val
    assert ner_setup.dataset.classes == ("O", "B-LOC", "B-PER")
    row = 0
    scored = (val.labels[row] != tokens.IGNORE).sum().item()
    assert scored == len(val.words[row])  # one label per word; later sub-tokens and specials are -100
    assert val.labels[row, 0] == tokens.IGNORE  # [CLS]


def test_ner_score_is_entity_f1(ner_setup: Setup) -> None:
    val, task = ner_setup.dataset.val, ner_setup.task
    perfect = torch.full((*val.labels.shape, 3), -5.0)
    perfect.scatter_(2, val.labels.clamp_min(0).unsqueeze(-1), 5.0)
    assert task.score(perfect, val)[1] == pytest.approx(1.0)
    all_o = torch.zeros_like(perfect)
    all_o[..., 0] = 5.0
    assert task.score(all_o, val)[1] == 0.0


def test_entities_of_a_tagged_sentence() -> None:
    found = entities(("John", "met", "Mary", "in", "New", "York"), ["B-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"])
    assert [(e["type"], e["text"]) for e in found] == [("PER", "John"), ("PER", "Mary"), ("LOC", "New York")]


def test_the_report_counts_scored_tokens_for_ner(ner_setup: Setup) -> None:
    val = ner_setup.dataset.val
    logits = torch.randn(*val.labels.shape, 3)
    probabilities, labels, rows = ner_setup.task.per_example(logits, val)
    assert len(probabilities) == len(labels) == len(rows) == sum(len(w) for w in val.words)
    assert "<mark" in ner_setup.task.example_html(val, [0])[0]


@pytest.mark.parametrize("freeze", ["linear_probe", "lp_ft"])
def test_cached_trial_equals_the_uncached_trial(text_setup: Setup, freeze: str) -> None:
    recipe = Recipe.from_params({"freeze": freeze, "lp_epochs": 2, "epochs": 3, "batch_size": 8, "lr": 3e-2,
                                 "augment": "none"})  # fmt: skip
    assert text_setup.feature_cache is not None
    cached = run_trial(text_setup, recipe, seed=3)
    assert text_setup.feature_cache.nbytes > 0  # built and used, though the encoder has dropout (frozen: eval)
    plain = run_trial(Setup(**{**text_setup.__dict__, "feature_cache": None, "prefix_cache": None}), recipe, seed=3)
    _assert_same_outcome(cached, plain)


def test_ner_partial_trials_use_the_prefix_cache_but_not_the_feature_cache(ner_setup: Setup) -> None:
    assert ner_setup.feature_cache.splits() is None  # per-token features: no pooled features to cache
    outcome = run_trial(ner_setup, Recipe.from_params({"freeze": "partial", "train_blocks": 1, "epochs": 1,
                                                        "batch_size": 8, "augment": "none"}), seed=0)  # fmt: skip
    assert len(outcome.history) == 1 and 0.0 <= outcome.best_score <= 1.0
    assert ner_setup.prefix_cache.bytes_in("memory") > 0  # tests/test_text_prefix.py: equal to the uncached trial


def test_text_tasks_are_registered_and_search_the_text_preset() -> None:
    assert {"text", "ner"} <= set(tasks.names())
    assert tasks.get("ner").default_space == tasks.get("text").default_space == "text"


def test_columns_are_detected_in_csv_tsv_and_jsonl_and_pairs_too(tmp_path: Path) -> None:
    from autoft.tasks.text import data

    (tmp_path / "a.tsv").write_text("Sentence\tLabel\nfine day\tpos\n")
    (tmp_path / "b.jsonl").write_text('{"premise": "a", "hypothesis": "b", "labels": "entail"}\n')
    tsv = data.read_sentences(tmp_path / "a.tsv", text_column=None, label_column=None, encoding="utf-8")
    assert tsv.texts == ("fine day",) and tsv.labels == ("pos",) and tsv.pairs is None
    pairs = data.read_sentences(tmp_path / "b.jsonl", text_column=None, label_column=None, encoding="utf-8")
    assert pairs.texts == ("a",) and pairs.pairs == ("b",) and pairs.labels == ("entail",)


def test_a_csv_field_with_a_unicode_line_separator_stays_one_row(tmp_path: Path) -> None:
    from autoft.tasks.text import data

    write_csv(tmp_path / "t.csv", [("one\u2028tweet\x1c", "a"), ("two", "b")])  # csv does not quote these
    read = data.read_sentences(tmp_path / "t.csv", text_column=None, label_column=None, encoding="utf-8")
    assert read.labels == ("a", "b")


def test_conll_iob1_becomes_iob2_and_docstart_is_skipped(tmp_path: Path) -> None:
    from autoft.tasks.text import data

    (tmp_path / "x.txt").write_text("-DOCSTART- O\n\nJohn I-PER\nSmith I-PER\nin O\nRome I-LOC\n\nHi O\n")
    read = data.read_conll(tmp_path / "x.txt", encoding="utf-8")
    assert read.words == (("John", "Smith", "in", "Rome"), ("Hi",))
    assert read.tags[0] == ("B-PER", "I-PER", "O", "B-LOC")


def test_class_folders_of_txt_files_are_text(tmp_path: Path) -> None:
    from autoft.tasks.text import data

    for label, text in (("pos", "lovely"), ("neg", "awful")):
        (tmp_path / label).mkdir()
        (tmp_path / label / "1.txt").write_text(text)
    assert SearchConfig(model="m", data=tmp_path).task == "text"
    assert data.read_class_folders(tmp_path, encoding="utf-8").labels == ("neg", "pos")


def test_ner_jsonl_tokens_and_tags(tmp_path: Path) -> None:
    from autoft.tasks.text import data

    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["Mary", "in", "Rome"], "tags": ["B-PER", "O", "I-LOC"]}\n\n')
    assert SearchConfig(model="m", data=path).task == "ner"
    assert data.read_tagged(path, encoding="utf-8").tags == (("B-PER", "O", "B-LOC"),)
