"""Tokenize once per search (the text counterpart of decoding images once), then batch by slicing.

Every split is tokenized in one call of the fast (Rust) tokenizer and held as one padded id tensor
``(N, max_length)`` plus each example's length. ``max_length`` comes from the data: the 98th percentile of the
train split's token counts (at least 8), capped by the model's positions; the 2% of examples past it are cut
(re-tokenized at that length, so they keep their closing special token). A batch is the rows it needs, trimmed
to its longest example (dynamic padding: a batch of tweets costs a tweet's length, not the longest tweet's).

NER: words are tokenized with ``is_split_into_words`` and labelled by ``word_ids()``: a word's first sub-token
carries its tag, the others (and special tokens) ``-100``, which the loss and the score skip. Evaluation takes
the examples by length (``TextTask.eval_order``); NER's ``(B, T, tags)`` logits of batches of different widths
are put back in order, zero-padded to the widest (``features.in_split_order``); scores cut the labels to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "IGNORE",
    "TextSplit",
    "batches",
    "choose_max_length",
    "encode_sentences",
    "encode_tagged",
    "model_inputs",
]

IGNORE = -100  # label of positions that are not scored (later sub-tokens, special tokens, padding)
PERCENTILE = 98
MIN_LENGTH = 8


@dataclass(frozen=True)
class TextSplit:
    """One tokenized split: ``input_ids`` ``(N, L)`` (padded), ``lengths`` ``(N,)``, optional ``token_type_ids``,
    ``labels`` ``(N,)`` class indices or ``(N, L)`` tag indices (``-100`` where not scored), and the raw text
    (``texts``/``pairs`` or NER ``words``/``tags``) for the report and scores."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor
    texts: tuple[str, ...] = ()
    pairs: tuple[str, ...] | None = None
    words: tuple[tuple[str, ...], ...] | None = None
    tags: tuple[tuple[str, ...], ...] | None = None
    pad_id: int = 0
    classes: tuple[str, ...] = ()  # the class (or tag) names label i stands for

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def token_level(self) -> bool:
        return self.labels.ndim == 2

    def select(self, rows: torch.Tensor) -> TextSplit:
        """The examples ``rows``, in that order."""
        pick = lambda values: tuple(values[i] for i in rows.tolist()) if values is not None else None  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[rows],
            lengths=self.lengths[rows],
            token_type_ids=self.token_type_ids[rows] if self.token_type_ids is not None else None,
            labels=self.labels[rows],
            texts=pick(self.texts) or (),
            pairs=pick(self.pairs),
            words=pick(self.words),
            tags=pick(self.tags),
        )

    def merged(self, other: TextSplit) -> TextSplit:
        """This split followed by ``other`` (padded to the wider of the two)."""
        width = max(self.max_length, other.max_length)
        join = lambda a, b: a + b if a is not None and b is not None else None  # noqa: E731
        return replace(
            self,
            input_ids=torch.cat(
                [_widen(self.input_ids, width, self.pad_id), _widen(other.input_ids, width, self.pad_id)]
            ),
            lengths=torch.cat([self.lengths, other.lengths]),
            token_type_ids=torch.cat([_widen(self.token_type_ids, width, 0), _widen(other.token_type_ids, width, 0)])
            if self.token_type_ids is not None and other.token_type_ids is not None
            else None,
            labels=torch.cat([_widen(self.labels, width, IGNORE), _widen(other.labels, width, IGNORE)])
            if self.token_level
            else torch.cat([self.labels, other.labels]),
            texts=self.texts + other.texts,
            pairs=join(self.pairs, other.pairs),
            words=join(self.words, other.words),
            tags=join(self.tags, other.tags),
        )


def _widen(values: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    if values.shape[1] == width:
        return values
    return torch.nn.functional.pad(values, (0, width - values.shape[1]), value=fill)


def choose_max_length(lengths: Sequence[int], *, limit: int) -> int:
    """The 98th percentile of the token counts (at least 8), capped by the model's ``limit``.

    >>> choose_max_length([10] * 98 + [400, 500], limit=512)
    10
    """
    if not len(lengths):
        return min(limit, MIN_LENGTH)
    return int(min(limit, max(MIN_LENGTH, math.ceil(np.percentile(lengths, PERCENTILE, method="inverted_cdf")))))


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[:width]
    return torch.from_numpy(out)


def _encode(tokenizer: Any, first: list, second: list | None, *, max_length: int, words: bool) -> Any:
    return tokenizer(
        first,
        second,
        truncation=True if second is None else "longest_first",
        max_length=max_length,
        is_split_into_words=words,
        padding=False,
        return_attention_mask=False,
    )


def _tokenized(
    tokenizer: Any, first: list, second: list | None, *, max_length: int | None, limit: int, words: bool
) -> tuple[Any, int]:
    """Encodings of every example at ``max_length`` (None: chosen from the token counts, re-encoding the few
    examples past it), and that length."""
    encoded = _encode(tokenizer, first, second, max_length=max_length or limit, words=words)
    if max_length is not None:
        return encoded, max_length
    chosen = choose_max_length([len(ids) for ids in encoded["input_ids"]], limit=limit)
    long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > chosen]
    if long:
        again = _encode(
            tokenizer,
            [first[i] for i in long],
            [second[i] for i in long] if second is not None else None,
            max_length=chosen,
            words=words,
        )
        for key in encoded:
            for j, i in enumerate(long):
                encoded[key][i] = again[key][j]
        where = {i: j for j, i in enumerate(long)}
        encoded._encodings = [  # word_ids() reads the encodings: keep them in step with the ids
            again._encodings[where[i]] if i in where else enc for i, enc in enumerate(encoded._encodings)
        ]
    return encoded, chosen


def encode_sentences(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    labels: Sequence[int],
    *,
    max_length: int | None,
    limit: int,
) -> TextSplit:
    """Tokenize sentences (or pairs) once; ``max_length=None`` chooses it from their token counts."""
    encoded, width = _tokenized(
        tokenizer,
        list(texts),
        list(pairs) if pairs is not None else None,
        max_length=max_length,
        limit=limit,
        words=False,
    )
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids") if pairs is not None else None
    return TextSplit(
        input_ids=_padded(ids, width, tokenizer.pad_token_id or 0),
        lengths=torch.tensor([len(row) for row in ids], dtype=torch.long),
        token_type_ids=_padded(types, width, 0) if types is not None else None,
        labels=torch.tensor(list(labels), dtype=torch.long),
        texts=tuple(texts),
        pairs=tuple(pairs) if pairs is not None else None,
        pad_id=tokenizer.pad_token_id or 0,
    )


def encode_tagged(
    tokenizer: Any,
    words: Sequence[Sequence[str]],
    tags: Sequence[Sequence[str]] | None,
    tag_ids: dict[str, int],
    *,
    max_length: int | None,
    limit: int,
) -> TextSplit:
    """Tokenize word sequences once and align word tags to sub-words (first sub-token scored, the rest -100).

    Without ``tags`` (prediction) each word's first sub-token gets tag 0, so the scored positions still mark it.
    """
    encoded, width = _tokenized(
        tokenizer, [list(w) for w in words], None, max_length=max_length, limit=limit, words=True
    )
    labels = np.full((len(words), width), IGNORE, dtype=np.int64)
    for row in range(len(words)):
        previous = None
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                labels[row, position] = tag_ids[tags[row][word]] if tags is not None else 0
            previous = word
    ids = encoded["input_ids"]
    return TextSplit(
        input_ids=_padded(ids, width, tokenizer.pad_token_id or 0),
        lengths=torch.tensor([len(row) for row in ids], dtype=torch.long),
        token_type_ids=None,
        labels=torch.from_numpy(labels),
        words=tuple(tuple(w) for w in words),
        tags=tuple(tuple(t) for t in tags) if tags is not None else None,
        texts=tuple(" ".join(w) for w in words),
        pad_id=tokenizer.pad_token_id or 0,
    )


def batches(
    split: TextSplit, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(inputs, labels)`` batches covering ``split`` once; ``inputs`` holds ``input_ids``, ``attention_mask``
    (and ``token_type_ids`` for pairs), trimmed to the batch's longest example. The shuffled order is
    ``torch.randperm(N, generator=generator)``, as :func:`autoft.tasks.base.batches` draws it, so head-only trials
    on cached features see the same batches."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        inputs = model_inputs(split, rows)
        labels = split.labels[rows, : inputs["input_ids"].shape[1]] if split.token_level else split.labels[rows]
        yield inputs, labels


def model_inputs(split: TextSplit, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The model inputs of the examples ``rows``: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for
    pairs), as wide as the longest of these examples."""
    lengths = split.lengths[rows]
    width = max(1, int(lengths.max()))
    inputs = {
        "input_ids": split.input_ids[rows, :width],
        "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
    }
    if split.token_type_ids is not None:
        inputs["token_type_ids"] = split.token_type_ids[rows, :width]
    return inputs
