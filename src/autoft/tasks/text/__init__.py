"""Text: sentence classification (``--task text``, optionally sentence pairs) and named-entity recognition
(``--task ner``) with any Hugging Face ``transformers`` encoder.

The second task behind the seam (:mod:`autoft.tasks.base`). ``data`` reads the files (CSV, TSV, JSONL, class
folders of .txt files; CoNLL or JSONL for NER), ``tokens`` tokenizes every split once and batches by slicing,
``models`` wraps the encoders to follow the model protocol, ``using`` predicts with an exported model.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from autoft.errors import AutoftError
from autoft.tasks import base
from autoft.tasks.text import data, models, tokens

if TYPE_CHECKING:
    from autoft.config import SearchConfig
    from autoft.recipe import Recipe
    from autoft.tasks.text.using import TunedText

__all__ = ["NerTask", "TextSpec", "TextTask"]


@dataclass(frozen=True)
class TextSpec:
    """How text becomes a model's inputs: the tokenizer (hub name or directory), the model's most positions and,
    for an exported model, the ``max_length`` its data was tokenized at (None: chosen from the data)."""

    tokenizer: str
    max_positions: int
    max_length: int | None = None


class TextTask(base.Task):
    """Sentence (or sentence-pair) classification with any transformers encoder; the score is accuracy."""

    name = "text"
    token_level = False
    default_space = "text"

    # --- models -----------------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        models.check(name)

    def create_model(self, name: str, config: SearchConfig) -> nn.Module:
        if config.weights is not None:
            raise AutoftError(
                "--weights is for image models; for text pass --model a directory with config.json, weights and a "
                "tokenizer."
            )
        return models.create(name, token_level=self.token_level, pretrained=config.pretrained)

    def input_spec(self, model: nn.Module, config: SearchConfig) -> TextSpec:
        tokenizer = models.load_tokenizer(model.source)
        return TextSpec(model.source, models.max_positions(model.encoder.config, tokenizer))

    # --- data -------------------------------------------------------------------------------------------------

    def read(self, config: SearchConfig) -> dict[str, Any]:
        """The raw splits (``data.Sentences``) of ``config.data``: split files, one file, or class folders."""
        root = config.data
        encoding = config.encoding
        if root.is_dir():
            files = data.split_files(root, data.TABLE_SUFFIXES)
            if "train" not in files:
                return {"train": data.read_class_folders(root, encoding=encoding)}
            return {split: self._read_file(path, config) for split, path in files.items()}
        return {"train": self._read_file(root, config)}

    def _read_file(self, path: Path, config: SearchConfig) -> data.Sentences:
        return data.read_sentences(
            path, text_column=config.text_column, label_column=config.label_column, encoding=config.encoding
        )

    def load_data(self, config: SearchConfig, spec: TextSpec) -> base.Dataset:
        splits = self.read(config)
        if "val" not in splits:
            splits["train"], splits["val"] = data.split_off(splits["train"], val_fraction=config.val_fraction,
                                                            seed=config.seed)  # fmt: skip
        classes = data.class_names(splits["train"])
        data.check_labels(classes, splits["train"], [s for k, s in splits.items() if k != "train"])
        tokenizer = models.load_tokenizer(spec.tokenizer)
        train = self.encode(tokenizer, splits["train"], classes, max_length=spec.max_length, limit=spec.max_positions)
        encoded = {
            k: self.encode(tokenizer, s, classes, max_length=train.max_length, limit=spec.max_positions)
            for k, s in splits.items()
            if k != "train"
        }
        lengths = train.lengths.float()
        inputs = (
            f"tokenized once: max_length {train.max_length} tokens ("
            + ("as exported" if spec.max_length else f"98th percentile of train, model limit {spec.max_positions}")
            + f"; train mean {lengths.mean():.1f})"
        )
        return base.Dataset(classes, train, encoded["val"], encoded.get("test"), config.data, 0, inputs=inputs)

    def encode(
        self, tokenizer: Any, split: data.Sentences, classes: tuple[str, ...], *, max_length: int | None, limit: int
    ) -> tokens.TextSplit:
        index = {name: i for i, name in enumerate(classes)}
        encoded = tokens.encode_sentences(
            tokenizer, split.texts, split.pairs, [index[label] for label in split.labels],
            max_length=max_length, limit=limit,
        )  # fmt: skip
        return replace(encoded, classes=classes)

    def batches(
        self, split: tokens.TextSplit, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[base.Batch]:
        return tokens.batches(split, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def train_inputs(
        self,
        batch: base.Batch,
        recipe: Recipe,
        spec: TextSpec,
        *,
        num_classes: int,
        device: torch.device,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids and labels moved to ``device``; text has no augmentation or mixing (the recipe's augment,
        mixup and cutmix are ignored; the text preset does not search them)."""
        inputs, labels = batch
        return self.eval_inputs(inputs, spec, device=device), labels.to(device, non_blocking=True)

    def eval_inputs(self, inputs: dict[str, torch.Tensor], spec: TextSpec, *, device: torch.device) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}

    def padded_width(self, split: tokens.TextSplit) -> int:
        return split.max_length

    def eval_order(self, split: tokens.TextSplit) -> torch.Tensor:
        return torch.argsort(split.lengths, stable=True)  # NER tweets: mean 31 tokens, max_length 55

    def select(self, split: tokens.TextSplit, rows: torch.Tensor) -> tokens.TextSplit:
        return split.select(rows)

    def merged(self, first: tokens.TextSplit, second: tokens.TextSplit) -> tokens.TextSplit:
        return first.merged(second)

    # --- outputs ----------------------------------------------------------------------------------------------

    def export_meta(self, spec: TextSpec) -> dict[str, Any]:
        return {
            "tokenizer": spec.tokenizer,
            "max_positions": spec.max_positions,
            "architecture": models.architecture(spec.tokenizer),
        }

    def dataset_meta(self, dataset: base.Dataset) -> dict[str, Any]:
        return {"max_length": dataset.train.max_length, "sentence_pairs": dataset.train.pairs is not None}

    def spec_from_meta(self, meta: dict[str, Any]) -> TextSpec:
        return TextSpec(meta["tokenizer"], int(meta["max_positions"]), meta.get("max_length"))

    def load_tuned(
        self, directory: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> TunedText:
        from autoft.tasks.text.using import TunedText

        model = models.from_config(
            meta["architecture"],
            token_level=self.token_level,
            num_classes=len(meta["classes"]),
            source=meta["tokenizer"],
        )
        model.load_state_dict(state)
        model.to(device).eval()
        return TunedText(model, tuple(meta["classes"]), meta, device, task=self, spec=self.spec_from_meta(meta))

    def example_html(self, split: tokens.TextSplit, rows: list[int]) -> list[str]:
        out = []
        for row in rows:
            pair = f'<br><span class="pair">{html.escape(split.pairs[row])}</span>' if split.pairs else ""
            out.append(f'<blockquote class="text">{html.escape(split.texts[row])}{pair}</blockquote>')
        return out


class NerTask(TextTask):
    """Named-entity recognition (token classification); the score is seqeval's entity-level F1 (micro)."""

    name = "ner"
    score_name = "entity F1"
    token_level = True

    def read(self, config: SearchConfig) -> dict[str, Any]:
        root = config.data
        if root.is_dir():
            files = data.split_files(root, data.NER_SUFFIXES)
            if "train" not in files:
                raise AutoftError(
                    f"{root} has no train file for NER (train.txt, train.conll or train.jsonl; optional "
                    "valid/dev and test files)."
                )
            return {split: data.read_tagged(path, encoding=config.encoding) for split, path in files.items()}
        return {"train": data.read_tagged(root, encoding=config.encoding)}

    def encode(
        self, tokenizer: Any, split: data.Tagged, classes: tuple[str, ...], *, max_length: int | None, limit: int
    ) -> tokens.TextSplit:
        index = {name: i for i, name in enumerate(classes)}
        encoded = tokens.encode_tagged(tokenizer, split.words, split.tags, index, max_length=max_length, limit=limit)
        return replace(encoded, classes=classes)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, recipe: Recipe) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=tokens.IGNORE, label_smoothing=recipe.label_smoothing
        )

    def score(self, logits: torch.Tensor, split: tokens.TextSplit) -> tuple[float, float]:
        from seqeval.metrics import f1_score

        labels = split.labels[:, : logits.shape[1]].to(logits.device)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=tokens.IGNORE).item()
        return loss, float(f1_score(list(map(list, split.tags)), word_tags(logits, split)))

    def per_example(self, logits: torch.Tensor, split: tokens.TextSplit) -> tuple[torch.Tensor, ...]:
        """One row per scored token (a word's first sub-token): its tag probabilities, gold tag and sentence."""
        labels = split.labels[:, : logits.shape[1]].to(logits.device)
        scored = labels != tokens.IGNORE
        rows = torch.arange(len(labels), device=logits.device)[:, None].expand_as(labels)[scored]
        return logits[scored].float().softmax(-1), labels[scored], rows

    def example_html(self, split: tokens.TextSplit, rows: list[int]) -> list[str]:
        return [_highlighted(split.words[row], split.tags[row]) for row in rows]

    def dataset_meta(self, dataset: base.Dataset) -> dict[str, Any]:
        return {"max_length": dataset.train.max_length}


def word_tags(logits: torch.Tensor, split: tokens.TextSplit) -> list[list[str]]:
    """The predicted IOB2 tag of every word: the argmax at its first sub-token; words cut by max_length get O."""
    predicted = logits.argmax(-1).cpu()
    scored = (split.labels[:, : logits.shape[1]] != tokens.IGNORE).cpu()
    out = []
    for row, words in enumerate(split.words):
        tags = [split.classes[i] for i in predicted[row][scored[row]].tolist()]
        out.append(tags[: len(words)] + ["O"] * (len(words) - len(tags)))
    return out


def entities(words: tuple[str, ...], tags: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """The entities of one tagged sentence: type, text and word span ``[start, end)``.

    >>> entities(("John", "lives", "in", "New", "York"), ["B-PER", "O", "O", "B-LOC", "I-LOC"])[1]
    {'type': 'LOC', 'text': 'New York', 'start': 3, 'end': 5}
    """
    from seqeval.metrics.sequence_labeling import get_entities

    return [
        {"type": kind, "text": " ".join(words[start : end + 1]), "start": start, "end": end + 1}
        for kind, start, end in get_entities(list(tags))
    ]


def _highlighted(words: tuple[str, ...], tags: tuple[str, ...]) -> str:
    """The sentence with its entities marked (``<mark>`` with the type), for the report."""
    spans = {e["start"]: e for e in entities(words, tags)}
    out, i = [], 0
    while i < len(words):
        if i in spans:
            e = spans[i]
            out.append(f'<mark title="{html.escape(e["type"])}">{html.escape(e["text"])} '
                       f'<sub>{html.escape(e["type"])}</sub></mark>')  # fmt: skip
            i = e["end"]
        else:
            out.append(html.escape(words[i]))
            i += 1
    return f'<blockquote class="text">{" ".join(out)}</blockquote>'
