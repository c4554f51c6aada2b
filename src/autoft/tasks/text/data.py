"""Text files: find the splits, read labelled sentences (CSV, TSV, JSONL, class folders) or tagged sentences (CoNLL,
JSONL), check them, and split off validation when there is no val file. Plain Python: nothing here tokenizes.

Bad input stops with one sentence naming the file (and line): an empty file, a missing column (with the columns
found), an undecodable byte (pass ``--encoding``), a malformed CoNLL line, one class, labels only in val/test.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoft.errors import AutoftError

__all__ = [
    "LABEL_COLUMNS",
    "NER_SUFFIXES",
    "PAIR_COLUMNS",
    "TABLE_SUFFIXES",
    "TEXT_COLUMNS",
    "Sentences",
    "Tagged",
    "check_labels",
    "class_names",
    "read_conll",
    "read_lines",
    "read_sentences",
    "read_tagged",
    "split_files",
    "split_off",
]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
NER_SUFFIXES = (".conll", ".txt", ".iob", ".bio", ".jsonl")
TEXT_COLUMNS = ("text", "sentence", "sentences", "review", "content", "tweet", "document", "body", "utterance")
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("text_a", "text_b"),
    ("text1", "text2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
)
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "y")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}
_TAG = re.compile(r"^(O|[BIES]-\S+)$")


@dataclass(frozen=True)
class Sentences:
    """Labelled sentences of one split: ``texts`` (and ``pairs`` for sentence pairs), string ``labels``."""

    texts: tuple[str, ...]
    pairs: tuple[str, ...] | None
    labels: tuple[str, ...]
    source: str  # the file or folder they came from, for messages

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: Sequence[int]) -> Sentences:
        pick = lambda values: tuple(values[i] for i in rows)  # noqa: E731
        return Sentences(pick(self.texts), pick(self.pairs) if self.pairs else None, pick(self.labels), self.source)


@dataclass(frozen=True)
class Tagged:
    """Tagged sentences of one split: ``words`` and their IOB2 ``tags``, one tuple per sentence."""

    words: tuple[tuple[str, ...], ...]
    tags: tuple[tuple[str, ...], ...]
    source: str

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, rows: Sequence[int]) -> Tagged:
        return Tagged(tuple(self.words[i] for i in rows), tuple(self.tags[i] for i in rows), self.source)


# ----------------------------------------------------------------------------- files


def read_text(path: Path, encoding: str) -> str:
    """The file decoded; an undecodable byte names the file and line and suggests ``--encoding``."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise AutoftError(
            f"{path}:{line} is not valid {encoding} (byte 0x{raw[err.start]:02x}); pass the file's encoding, "
            "e.g. --encoding latin-1."
        ) from None
    except LookupError:
        raise AutoftError(f"--encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1).") from None
    return text.removeprefix("\ufeff")


def read_lines(path: Path, encoding: str) -> list[str]:
    """The file's lines: split at ``\n`` only (``str.splitlines`` would also split at characters such as U+2028
    or \x1c, which tweets contain and CSV does not quote)."""
    lines = [line.removesuffix("\r") for line in read_text(path, encoding).split("\n")]
    return lines[:-1] if lines and not lines[-1] else lines


def split_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``{"train": ..., "val": ..., "test": ...}``: the split files in ``folder`` (``dev``/``valid`` count as val)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        for split, names in SPLIT_NAMES.items():
            if path.stem.lower() in names and split not in found:
                found[split] = path
    return found


# ----------------------------------------------------------------------------- sentence classification


def _rows(path: Path, encoding: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of a CSV, TSV or JSONL file."""
    if path.suffix.lower() == ".jsonl":
        rows = [row for _, row in _json_rows(path, encoding)]
        return list(dict.fromkeys(k for row in rows for k in row)), rows
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(read_text(path, encoding), newline=""), delimiter=delimiter)
    rows = [row for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    return list(reader.fieldnames or []), rows


def _json_rows(path: Path, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file."""
    for number, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AutoftError(f"{path}:{number} is not a JSON object ({err.msg}).") from None
        if not isinstance(row, dict):
            raise AutoftError(f"{path}:{number} is not a JSON object with named fields.")
        yield number, row


def _column(columns: Sequence[str], given: str | None, names: Iterable[str], what: str, flag: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise AutoftError(f"{path} has no column {given!r} ({flag}); its columns are: {', '.join(columns)}.")
        return given
    lower = {c.lower(): c for c in columns}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None:
        raise AutoftError(
            f"{path} has no {what} column (looked for {', '.join(names)}); its columns are: "
            f"{', '.join(columns) or 'none'}; name it with {flag}."
        )
    return found


def _text_columns(columns: Sequence[str], given: str | None, path: Path) -> tuple[str, str | None]:
    """The text column, and the second text column of sentence pairs (``--text-column a,b`` or detected)."""
    if given is not None and "," in given:
        first, second = (part.strip() for part in given.split(",", 1))
        return _column(columns, first, (), "text", "--text-column", path), _column(
            columns, second, (), "text", "--text-column", path
        )
    if given is None:
        lower = {c.lower(): c for c in columns}
        pair = next(((lower[a], lower[b]) for a, b in PAIR_COLUMNS if a in lower and b in lower), None)
        if pair is not None:
            return pair
    return _column(columns, given, TEXT_COLUMNS, "text", "--text-column", path), None


def read_sentences(
    path: Path, *, text_column: str | None, label_column: str | None, encoding: str, labelled: bool = True
) -> Sentences:
    """Labelled sentences from a CSV / TSV / JSONL file (``labelled=False``: labels may be absent, for predict).

    >>> read_sentences(Path("reviews.csv"), text_column=None, label_column=None, encoding="utf-8")  # doctest: +SKIP
    """
    columns, rows = _rows(path, encoding)
    if not rows:
        raise AutoftError(f"{path} has no examples (an empty file, or a header only).")
    first, second = _text_columns(columns, text_column, path)
    label = (
        _column(columns, label_column, LABEL_COLUMNS, "label", "--label-column", path)
        if labelled or label_column is not None
        else None
    )
    texts, pairs, labels = [], [], []
    for number, row in enumerate(rows, 2 if path.suffix.lower() != ".jsonl" else 1):
        value = row.get(label) if label is not None else ""
        if value is None or (label is not None and not str(value).strip()):
            raise AutoftError(f"{path}: example {number} has no value in the label column {label!r}.")
        texts.append(str(row.get(first) or ""))
        pairs.append(str(row.get(second) or "") if second else "")
        labels.append(str(value).strip())
    return Sentences(tuple(texts), tuple(pairs) if second else None, tuple(labels), str(path))


def read_class_folders(folder: Path, *, encoding: str) -> Sentences:
    """One example per ``.txt`` file, labelled by its sub-folder (``folder/<class>/*.txt``)."""
    texts, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.glob("*.txt")):
            texts.append("\n".join(read_lines(file, encoding)).strip())
            labels.append(class_dir.name)
    if not texts:
        raise AutoftError(f"{folder} has no examples: give a CSV/TSV/JSONL file or class folders of .txt files.")
    return Sentences(tuple(texts), None, tuple(labels), str(folder))


# ----------------------------------------------------------------------------- token classification


def _iob2(tags: list[str]) -> list[str]:
    """IOB1 (I- may start an entity) or IOBES -> IOB2: every entity starts with B-."""
    out = []
    for i, tag in enumerate(tags):
        kind, _, name = tag.partition("-")
        if kind in ("S", "B") or (kind in ("I", "E") and (i == 0 or out[-1] == "O" or out[-1][2:] != name)):
            out.append(f"B-{name}")
        elif kind in ("I", "E"):
            out.append(f"I-{name}")
        else:
            out.append("O")
    return out


def read_conll(path: Path, *, encoding: str) -> Tagged:
    """CoNLL: one token per line with its tag in the last column (2 or 4 columns, tab or space separated), a blank
    line between sentences, ``-DOCSTART-`` lines ignored; IOB1, IOB2 or IOBES tags, returned as IOB2."""
    words: list[tuple[str, ...]] = []
    tags: list[tuple[str, ...]] = []
    sentence: list[str] = []
    sentence_tags: list[str] = []

    def end() -> None:
        if sentence:
            words.append(tuple(sentence))
            tags.append(tuple(_iob2(sentence_tags)))
            sentence.clear()
            sentence_tags.clear()

    for number, line in enumerate(read_lines(path, encoding), 1):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if not line.strip():
            end()
            continue
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2 or not fields[0] or not _TAG.match(fields[-1]):
            raise AutoftError(
                f"{path}:{number} is not a CoNLL line 'TOKEN ... TAG' with an IOB tag (O, B-X, I-X) last: {line!r}."
            )
        sentence.append(fields[0])
        sentence_tags.append(fields[-1])
    end()
    if not words:
        raise AutoftError(f"{path} has no tagged sentences (an empty file?).")
    return Tagged(tuple(words), tuple(tags), str(path))


def read_tagged_jsonl(path: Path, *, encoding: str) -> Tagged:
    """JSONL with ``tokens`` and ``tags`` (or ``ner_tags`` as strings) per line."""
    words, tags = [], []
    for number, row in _json_rows(path, encoding):
        tokens, labels = row.get("tokens"), row.get("tags", row.get("ner_tags"))
        if not isinstance(tokens, list) or not isinstance(labels, list) or len(tokens) != len(labels):
            raise AutoftError(f"{path}:{number} needs 'tokens' and 'tags' lists of the same length.")
        if not all(isinstance(t, str) and _TAG.match(t) for t in labels):
            raise AutoftError(f"{path}:{number} has a tag that is not an IOB tag (O, B-X, I-X): {labels!r}.")
        if tokens:
            words.append(tuple(map(str, tokens)))
            tags.append(tuple(_iob2(labels)))
    if not words:
        raise AutoftError(f"{path} has no tagged sentences (an empty file?).")
    return Tagged(tuple(words), tuple(tags), str(path))


def read_tagged(path: Path, *, encoding: str) -> Tagged:
    """Tagged sentences from a CoNLL or JSONL file."""
    if path.suffix.lower() == ".jsonl":
        return read_tagged_jsonl(path, encoding=encoding)
    return read_conll(path, encoding=encoding)


# ----------------------------------------------------------------------------- checks and splitting


def class_names(train: Sentences | Tagged) -> tuple[str, ...]:
    """The classes (sorted labels) or tags (``O`` first, then sorted) the training split has."""
    if isinstance(train, Tagged):
        tags = {t for sentence in train.tags for t in sentence}
        return ("O", *sorted(tags - {"O"}))
    return tuple(sorted(set(train.labels)))


def check_labels(classes: tuple[str, ...], train: Sentences | Tagged, others: Iterable[Sentences | Tagged]) -> None:
    """At least two classes (or one entity type) in train; no label in val/test that train lacks."""
    if isinstance(train, Tagged) and len(classes) < 2:
        raise AutoftError(f"{train.source}: every token is tagged O; NER needs entity tags such as B-PER, I-PER.")
    if not isinstance(train, Tagged) and len(classes) < 2:
        raise AutoftError(
            f"{train.source}: every training example has the label {classes[0]!r}; classification needs at least "
            "2 classes."
        )
    for split in others:
        labels = {t for s in split.tags for t in s} if isinstance(split, Tagged) else set(split.labels)
        unknown = sorted(labels - set(classes))
        if unknown:
            raise AutoftError(
                f"{split.source} has label(s) {', '.join(map(repr, unknown[:5]))} that no training example has; "
                "the model cannot learn a class it never sees in train."
            )


def split_off(examples: Sentences | Tagged, *, val_fraction: float, seed: int) -> tuple[Any, Any]:
    """Train and val from one split: stratified by label for sentences (each class keeps an example on both
    sides), a seeded shuffle of sentences for tagged data."""
    rng = np.random.default_rng(seed)
    if isinstance(examples, Tagged):
        order = rng.permutation(len(examples))
        n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
        return examples.subset(sorted(order[n_val:].tolist())), examples.subset(sorted(order[:n_val].tolist()))
    labels = np.array(examples.labels)
    train_rows, val_rows = [], []
    for name in sorted(set(examples.labels)):
        rows = np.flatnonzero(labels == name)
        rows = rows[rng.permutation(len(rows))]
        n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
        val_rows += rows[:n_val].tolist()
        train_rows += rows[n_val:].tolist()
    return examples.subset(sorted(train_rows)), examples.subset(sorted(val_rows))
