"""Shared helpers of the text tests: a tiny randomly initialised BERT with a WordPiece vocabulary written to disk
(so ``AutoTokenizer`` loads offline), and small generated sentence and CoNLL files."""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ("great", "good", "lovely", "excellent", "happy", "nice", "superb", "fine")
NEGATIVE = ("awful", "bad", "terrible", "poor", "sad", "horrible", "broken", "ugly")
FILLER = ("the", "phone", "battery", "screen", "is", "was", "really", "very", "quite", "and", "a", "day", "film")
NAMES = ("john", "mary", "alice", "bob")
PLACES = ("paris", "london", "berlin", "rome")


def write_tiny_bert(directory: Path, *, layers: int = 2, hidden: int = 32) -> Path:
    """A BERT with ``layers`` layers of width ``hidden``, random weights, and a WordPiece tokenizer of the words
    above (plus letters and ``##`` pieces, a few hundred tokens) saved in ``directory``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'", *letters, *(f"##{c}" for c in letters)]
    vocab += [w for w in (*POSITIVE, *NEGATIVE, *FILLER, *NAMES, *PLACES, "lives", "in", "met", "visited")]
    vocab += [f"w{i}" for i in range(300 - len(vocab))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def sentences(count: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (text, label) pairs: a positive or negative word among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = ("positive", "negative")[i % 2]
        words = [*rng.sample(FILLER, rng.randint(2, 6)), rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]], *, header: tuple[str, str] = ("text", "label")) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tagged(count: int, *, seed: int = 0) -> list[list[tuple[str, str]]]:
    """``count`` sentences of (word, IOB2 tag): people (PER) and places (LOC) among filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        sentence = [(rng.choice(NAMES), "B-PER"), ("lives", "O"), ("in", "O"), (rng.choice(PLACES), "B-LOC")]
        if rng.random() < 0.5:
            sentence = [(w, "O") for w in rng.sample(FILLER, 2)] + sentence
        out.append(sentence)
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]], *, docstart: bool = True) -> Path:
    """CoNLL-2003 style: four columns (token, POS, chunk, tag), a -DOCSTART- line, blank lines between sentences."""
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for sentence in sentences:
        lines += [f"{word} NN I-NP {tag}" for word, tag in sentence] + [""]
    path.write_text("\n".join(lines))
    return path
