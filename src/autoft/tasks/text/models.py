"""Hugging Face encoders behind the model protocol: a hub name (from the local cache when offline) or a directory.

:class:`SentenceClassifier` and :class:`TokenClassifier` wrap any ``transformers`` encoder (``AutoModel``: BERT,
DistilBERT, RoBERTa, MiniLM, ELECTRA, ...) with a new linear head. Their block groups are the embeddings (and
anything else outside the layer stack), then each encoder layer, so partial freezing of the last k layers and
layer-wise learning-rate decay work through :mod:`autoft.blocks` and :mod:`autoft.optim` unchanged. The encoder's
pooler (BERT's, RoBERTa's) is dropped: the sentence classifier mean-pools the last hidden states over the
attention mask, which suits every encoder (sentence-transformers checkpoints are trained for it).

The sentence classifier has ``forward_features`` (pooled features) and ``forward_head``, so head-only trials run on
the feature cache. The token classifier has neither: its per-token features have one length per batch, so it
runs uncached.

Both split themselves for the prefix cache (``split_blocks``; ``torch.fx`` cannot trace the transformers code):
the prefix runs the embeddings and the frozen layers, the suffix the trainable layers and the head, each calling
the encoder's own modules and its attention-mask helper. Two things cross the cut, the hidden states and the
attention mask, so they travel as one tensor ``(B, T, 1 + hidden)`` with the mask in channel 0. In training the
suffix cuts a batch to its longest example, as :func:`~autoft.tasks.text.tokens.batches` cuts training batches
(dynamic padding: the same cost, and the same shapes, so the trainable layers' dropout draws what the uncached
trial draws); token logits are padded back to the width they came in (positions past every example are not
scored). The split reproduces encoders whose forward is embeddings, then the layer stack, each layer taking
``(hidden, mask)``: BERT, RoBERTa, ELECTRA without an embedding projection, MiniLM, DistilBERT; any other fails
the prefix cache's equality check and its partial trials run uncached.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoft.errors import AutoftError

__all__ = ["SentenceClassifier", "TokenClassifier", "check", "create", "from_config", "load_tokenizer"]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return " (HF_HUB_OFFLINE is set: only the local cache is read)" if offline else ""


def check(name: str) -> None:
    """Raise one clear sentence when ``name`` is neither a usable model directory nor a model the hub (or its
    local cache) has."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AutoftError(
                f"Model directory {path} has no config.json; it needs config.json, weights and a tokenizer."
            )
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise AutoftError(
                f"Model directory {path} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...); save one there "
                "with tokenizer.save_pretrained(directory)."
            )
        return
    if name.startswith(("/", ".", "~")):
        raise AutoftError(f"Model directory {path} does not exist; pass --model a directory or a Hugging Face name.")
    _config(name)


@functools.cache
def _config(name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name)
    except (OSError, ValueError) as err:
        raise AutoftError(
            f"Model {name!r} is neither a directory nor a Hugging Face model found on the hub or in its local "
            f"cache{_offline_hint()}; pass a directory with config.json, weights and a tokenizer "
            f"({type(err).__name__})."
        ) from None


def _source(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


@functools.cache
def load_tokenizer(source: str) -> Any:
    """The fast tokenizer of ``source`` (a hub name or a directory), loaded once per process."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise AutoftError(
            f"The tokenizer of {source!r} could not be loaded{_offline_hint()} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]})."
        ) from None
    if not tokenizer.is_fast:
        raise AutoftError(f"The tokenizer of {source!r} is not a fast tokenizer; autoft needs tokenizer.json.")
    return tokenizer


def max_positions(config: Any, tokenizer: Any) -> int:
    """The most tokens the model takes: its position table, and the tokenizer's limit when that is set."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 100_000]
    return min(usable) if usable else 512


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar while it loads weights; the CLI owns the terminal."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _layer_stack(encoder: nn.Module) -> str:
    """The name of the encoder's layer stack: the ModuleList with the most children (``encoder.layer``)."""
    stacks = [(len(m), name) for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise AutoftError(f"{type(encoder).__name__} has no list of layers; autoft needs a transformer encoder.")
    return max(stacks)[1]


class _Encoder(nn.Module):
    """An encoder with a new linear head, following the model protocol."""

    pooled = False  # whether the head sees the mean-pooled hidden states (a sentence) or every token's

    def __init__(self, encoder: nn.Module, num_classes: int = 1, *, source: str = "") -> None:
        super().__init__()
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None  # unused: mean pooling (sentences) or every token (NER)
        self.encoder = encoder
        self.source = source
        self.num_features = int(encoder.config.hidden_size)
        self.head = nn.Linear(self.num_features, num_classes)
        self._layers = f"encoder.{_layer_stack(encoder)}."

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**inputs).last_hidden_state

    def split_blocks(self, start: int) -> tuple[nn.Module, nn.Module] | str:
        """``(prefix, suffix)`` cut before block group ``start`` (layer ``start - 1``; past the last layer, before the
        head), sharing this model's modules:
        ``prefix(inputs)`` -> ``(B, T, 1 + hidden)`` (the attention mask, then the hidden states entering the
        layer), ``suffix(activations)`` -> the logits ``forward`` gives (a reason instead when it cannot split)."""
        layers = self._layer_list()
        if not isinstance(getattr(self.encoder, "embeddings", None), nn.Module):
            return f"{type(self.encoder).__name__} has no embeddings module"
        if not 0 < start <= len(layers) + 1:  # len + 1: every layer frozen, the head alone trains (a linear probe)
            return f"group {start} is not an encoder layer or the head"
        config = self.encoder.config
        prefix = _Prefix(self.encoder.embeddings, layers[: start - 1], config)
        return prefix, _Suffix(layers[start - 1 :], self.head, config, pooled=self.pooled)

    def _layer_list(self) -> nn.ModuleList:
        return self.encoder.get_submodule(self._layers[len("encoder.") : -1])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes)

    def group_matcher(self, coarse: bool = True) -> Any:
        """Ordinal of a parameter's block group: 0 for the embeddings (and anything outside the layer stack),
        ``i + 1`` for layer ``i``; the head is excluded by :func:`autoft.blocks.block_groups`."""
        layers, count = self._layers, len(self._layer_list())

        def ordinal(name: str) -> int:
            if name.startswith(layers):
                return 1 + int(name[len(layers) :].split(".", 1)[0])
            return count + 1 if name.startswith("head.") else 0

        return ordinal


class SentenceClassifier(_Encoder):
    """Sentence (or sentence-pair) classification: mean-pooled last hidden states -> linear head, ``(N, C)``."""

    pooled = True

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _mean_pooled(self.hidden_states(inputs), inputs["attention_mask"])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(inputs))


class TokenClassifier(_Encoder):
    """Token classification (NER): a linear head on every token's last hidden state, ``(N, T, C)``."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.hidden_states(inputs))


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` ``(B, T, D)`` over the positions ``mask`` ``(B, T)`` marks."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _layer_mask(config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """What the encoder's layers take as attention mask, made from the ``(B, T)`` mask as the encoder makes it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4: the additive (B, 1, 1, T) mask of get_extended_attention_mask
        return (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def _run_layers(layers: nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor, config: Any) -> torch.Tensor:
    """``hidden`` through ``layers`` as the encoder runs its layer stack (a layer may return a tuple)."""
    if len(layers):
        attention = _layer_mask(config, hidden, mask)
        for layer in layers:
            out = layer(hidden, attention)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class _Prefix(nn.Module):
    """The frozen block groups: the embeddings, then the first layers; one tensor out, the mask in channel 0."""

    def __init__(self, embeddings: nn.Module, layers: nn.ModuleList, config: Any) -> None:
        super().__init__()
        self.embeddings, self.layers, self.config = embeddings, layers, config

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.embeddings(**{k: v for k, v in inputs.items() if k != "attention_mask"})
        hidden = _run_layers(self.layers, hidden, mask, self.config)
        return torch.cat([mask.unsqueeze(-1).to(hidden.dtype), hidden], dim=-1)


class _Suffix(nn.Module):
    """The trainable layers and the head, on the prefix's ``(B, T, 1 + hidden)`` activations."""

    def __init__(self, layers: nn.ModuleList, head: nn.Module, config: Any, *, pooled: bool) -> None:
        super().__init__()
        self.layers, self.head, self.config, self.pooled = layers, head, config, pooled

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        width = activations.shape[1]
        if self.head.training:  # the model's mode, as the trial sets it (this wrapper is not one of its modules)
            activations = activations[:, : max(1, int(activations[..., 0].sum(1).max()))]  # the longest example's
        mask = activations[..., 0].long()
        hidden = _run_layers(self.layers, activations[..., 1:], mask, self.config)
        if self.pooled:
            return self.head(_mean_pooled(hidden, mask))
        return F.pad(self.head(hidden), (0, 0, 0, width - hidden.shape[1]))


def _wrapper(token_level: bool) -> type[_Encoder]:
    return TokenClassifier if token_level else SentenceClassifier


def create(name: str, *, token_level: bool, pretrained: bool = True, num_classes: int = 1) -> _Encoder:
    """The encoder ``name`` (hub name or directory) with a new head; ``pretrained=False``: random weights.

    >>> ordinal = create("./minilm", token_level=False).group_matcher()  # doctest: +SKIP
    >>> ordinal("encoder.encoder.layer.3.output.dense.weight")  # doctest: +SKIP
    4
    """
    from transformers import AutoModel

    check(name)
    config = _config(name)
    source = _source(name)
    if pretrained:
        try:
            with _no_progress_bars():
                encoder = AutoModel.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise AutoftError(f"The weights of {name!r} could not be loaded{_offline_hint()} ({err}).") from None
    else:
        encoder = AutoModel.from_config(config)
    return _wrapper(token_level)(encoder, num_classes, source=source)


def from_config(config: dict[str, Any], *, token_level: bool, num_classes: int, source: str = "") -> _Encoder:
    """An encoder of the architecture ``config`` (a ``config.json`` as a dict), randomly initialised (to load a
    tuned state dict into)."""
    from transformers import AutoConfig, AutoModel

    settings = dict(config)
    encoder = AutoModel.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))
    return _wrapper(token_level)(encoder, num_classes, source=source)


def architecture(name: str) -> dict[str, Any]:
    """The encoder's configuration as plain data (saved in ``best/config.json`` to rebuild the model)."""
    return _config(name).to_dict()
