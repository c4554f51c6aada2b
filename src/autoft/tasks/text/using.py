"""Using an exported text model: predict labels (or entities) for sentences, score it on a labelled file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoft.errors import AutoftError
from autoft.tasks.base import Deployable, LoadedModel
from autoft.tasks.text import data, models, tokens

__all__ = ["CHECK_SENTENCES", "TextEvaluation", "TunedText", "read_inputs"]

# What an export is traced on (the first four) and checked on (the rest: another batch size and length), when the
# user gives no sentences of their own: real text, so the tokenizer, padding and attention mask all take part.
CHECK_SENTENCES = (
    "The battery died after two days.",
    "Great screen, but the speakers are awful and the case cracked within a week of light use.",
    "Alice flew from Paris to Berlin on Monday.",
    "Not bad.",
    "John Smith works for the United Nations in New York.",
    "I would not buy this phone again.",
    "Ok",
)


@dataclass(frozen=True)
class TextEvaluation:
    """A tuned model's score on a labelled file: the task's score (accuracy or entity F1), macro-F1 for classes,
    per-class (or per-entity-type) scores, and for classes the confusion matrix (rows true, columns predicted)."""

    score_name: str
    score: float
    count: int
    per_class: dict[str, float]
    per_class_name: str
    macro_f1: float | None = None
    confusion: list[list[int]] | None = None


@dataclass
class TunedText(LoadedModel):
    """A fine-tuned text model with its tokenizer: give it sentences, get labels (or, for NER, entities) back.

    >>> tuned = load_model("runs/minilm-reviews/best")  # doctest: +SKIP
    >>> tuned.predict(["great phone", "awful battery"])  # doctest: +SKIP
    ['positive', 'negative']
    """

    task: Any = None
    spec: Any = None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.spec.tokenizer)
        return self._tokenizer

    def encode(self, sentences: Sequence[Any]) -> tokens.TextSplit:
        """Sentences as a tokenized split (no labels): strings, (text, pair) tuples, or for NER word lists."""
        if self.task.token_level:
            words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
            split = tokens.encode_tagged(self.tokenizer, words, None, {}, max_length=self.spec.max_length,
                                         limit=self.spec.max_positions)  # fmt: skip
        else:
            pairs = [s[1] for s in sentences] if sentences and not isinstance(sentences[0], str) else None
            texts = [s if isinstance(s, str) else s[0] for s in sentences]
            split = tokens.encode_sentences(self.tokenizer, texts, pairs, [0] * len(texts),
                                            max_length=self.spec.max_length, limit=self.spec.max_positions)  # fmt: skip
        return _with_classes(split, self.classes)

    def deployable(self, examples: Sequence[Any] | None = None) -> Deployable:
        """Token ids and attention mask in (``(N, T)`` int64; token type ids too for sentence pairs), logits out,
        batch and sequence axes dynamic; checked on ``examples`` (sentences, or files of them as ``autoft predict``
        reads them; None: the rest of :data:`CHECK_SENTENCES`)."""
        traced = self._inputs(CHECK_SENTENCES[:4])
        sentences = read_inputs(examples, text_column=None, encoding="utf-8") if examples else CHECK_SENTENCES[4:]
        if not sentences:
            raise AutoftError(f"The examples to check the export on ({', '.join(map(str, examples))}) hold no text.")
        check = self._inputs(sentences)
        batch = torch.export.Dim("batch", min=1)
        sequence = torch.export.Dim("sequence", min=1, max=self.spec.max_positions)
        module = _TokenInputs(self.model).eval()
        with torch.inference_mode():
            expected = module(*check.values()).float()
        meta = {k: self.meta[k] for k in ("model", "task", "classes", "tokenizer", "max_length") if k in self.meta}
        meta["input"] = f"int64 (N, T) {', '.join(traced)} from the tokenizer; logits " + (
            "(N, T, tags): one row per token, a word scored at its first sub-token" if self.task.token_level
            else "(N, classes)"
        )  # fmt: skip
        return Deployable(
            module=module,
            example=traced,
            dynamic={name: {0: batch, 1: sequence} for name in traced},
            check=check,
            expected=expected,
            meta=meta,
        )

    def _inputs(self, sentences: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The model inputs of ``sentences`` as one batch (sentence pairs of a pair model: each with the next)."""
        if self.meta.get("sentence_pairs") and sentences and isinstance(sentences[0], str):
            sentences = [(s, sentences[(i + 1) % len(sentences)]) for i, s in enumerate(sentences)]
        split = self.encode(sentences)
        return tokens.model_inputs(split, slice(None))

    @torch.inference_mode()
    def logits(self, split: tokens.TextSplit, *, batch_size: int = 64) -> torch.Tensor:
        """Raw scores, float32 on the CPU: ``(N, classes)``, or ``(N, T, tags)`` for NER."""
        if not len(split):
            return torch.zeros(0, len(self.classes))
        from autoft.trial import predict_logits  # by length, as a search evaluates (the import is heavy)

        return predict_logits(self.model, split, self.task, self.spec, device=self.device, batch_size=batch_size).cpu()

    def predict_proba(self, sentences: Sequence[Any]) -> torch.Tensor:
        """Class probabilities ``(N, classes)`` (sentence classification)."""
        if self.task.token_level:
            raise AutoftError("predict_proba is for sentence classification; an NER model's predict gives entities.")
        return self.logits(self.encode(sentences)).softmax(1)

    def predict(self, sentences: Sequence[Any]) -> list[Any]:
        """The most likely class of each sentence; for NER, each sentence's entities (type, text, word span)."""
        if not self.task.token_level:
            return [self.classes[i] for i in self.predict_proba(sentences).argmax(1).tolist()]
        from autoft.tasks.text import entities, word_tags

        split = self.encode(sentences)
        return [entities(w, t) for w, t in zip(split.words, word_tags(self.logits(split), split), strict=True)]

    def evaluate(self, path: Path, *, text_column: str | None = None, label_column: str | None = None,
                 encoding: str = "utf-8") -> TextEvaluation:  # fmt: skip
        """Score the model on a labelled file (CSV/TSV/JSONL; CoNLL or JSONL for NER) with its own classes."""
        if self.task.token_level:
            tagged = data.read_tagged(path, encoding=encoding)
            data.check_labels(self.classes, _Named(self.classes), [tagged])
            split = self.task.encode(self.tokenizer, tagged, self.classes, max_length=self.spec.max_length,
                                     limit=self.spec.max_positions)  # fmt: skip
            return _entity_scores(self.logits(split), split)
        sentences = data.read_sentences(path, text_column=text_column, label_column=label_column, encoding=encoding)
        data.check_labels(self.classes, _Named(self.classes), [sentences])
        split = self.task.encode(self.tokenizer, sentences, self.classes, max_length=self.spec.max_length,
                                 limit=self.spec.max_positions)  # fmt: skip
        return _class_scores(self.logits(split).argmax(1), split.labels, self.classes)


class _TokenInputs(nn.Module):
    """A text model taking its input tensors as arguments (what ONNX and TorchScript files take)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(inputs)


@dataclass(frozen=True)
class _Named:
    """The classes a model knows, standing in for a training split in :func:`data.check_labels`."""

    labels: tuple[str, ...]
    source: str = "the model"


def _with_classes(split: tokens.TextSplit, classes: tuple[str, ...]) -> tokens.TextSplit:
    from dataclasses import replace

    return replace(split, classes=classes)


def _class_scores(predicted: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> TextEvaluation:
    n = len(classes)
    confusion = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    true, guessed, right = confusion.sum(1), confusion.sum(0), confusion.diagonal()
    recall = right / true.clamp_min(1)
    f1 = 2 * right / (true + guessed).clamp_min(1)
    present = true > 0
    return TextEvaluation(
        score_name="accuracy",
        score=right.sum().item() / max(1, len(labels)),
        count=len(labels),
        per_class={c: recall[i].item() for i, c in enumerate(classes) if present[i]},
        per_class_name="recall",
        macro_f1=f1[present].mean().item() if present.any() else 0.0,
        confusion=confusion.tolist(),
    )


def _entity_scores(logits: torch.Tensor, split: tokens.TextSplit) -> TextEvaluation:
    from seqeval.metrics import classification_report, f1_score

    from autoft.tasks.text import word_tags

    gold, predicted = list(map(list, split.tags)), word_tags(logits, split)
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    kinds = sorted(k for k in report if not k.endswith(" avg"))
    return TextEvaluation(
        score_name="entity F1",
        score=float(f1_score(gold, predicted)),
        count=len(split),
        per_class={k: float(report[k]["f1-score"]) for k in kinds},
        per_class_name="F1",
        macro_f1=float(report["macro avg"]["f1-score"]) if "macro avg" in report else None,
    )


def read_inputs(items: Sequence[str], *, text_column: str | None, encoding: str) -> list[str]:
    """What ``autoft predict`` classifies: each item is a file of lines (.txt), a CSV/TSV/JSONL file (its text
    column), or else a sentence itself."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in data.TABLE_SUFFIXES:
            rows = data.read_sentences(path, text_column=text_column, label_column=None, encoding=encoding,
                                       labelled=False)  # fmt: skip
            out += list(rows.texts)
        elif path.is_file():
            out += [line for line in data.read_lines(path, encoding) if line.strip()]
        else:
            out.append(item)
    return out
