"""The task seam: what the search core may know about the data and the model, and nothing more.

A task answers the questions that differ between images and text (or any other data): how to read the data
into splits, how to create a pretrained model with a new head, how a batch becomes model inputs and targets,
how predictions are scored, and how an exported model is loaded back. The search core (spaces, study, plan,
selection, backends, the run folder, the final model, the report's study figures) talks to a :class:`Task`
and to models that follow the *model protocol* below; it never imports a task's own modules.

The model protocol (timm's, so timm models follow it as they are; a task wraps other models to follow it):

- ``get_classifier() -> nn.Module`` and ``reset_classifier(num_classes)``: the head, and a new one;
- ``group_matcher(coarse=True)`` (optional): the backbone's block groups in forward order, for partial
  freezing and layer-wise learning-rate decay; without it the top-level children are the groups;
- ``forward_features(x)`` and ``forward_head(features, pre_logits=True)``: the pooled features the head
  sees, for the feature cache (a model without them simply runs uncached);
- ``split_blocks(start) -> (prefix, suffix)`` (optional): the model cut before block group ``start``, two modules
  sharing its own, ``prefix(x)`` -> one tensor, ``suffix(that tensor)`` -> the logits ``forward`` gives, for the
  prefix cache (without it the model is split with ``torch.fx`` where it can be);
- ``forward(x) -> logits``: ``(N, classes)``.

Adding a task: a module or package with a :class:`Task` subclass, registered with :func:`autoft.tasks.register`;
docs/architecture.md walks through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoft.errors import AutoftError
from autoft.tasks import pages

if TYPE_CHECKING:  # the config is the ground floor; a task only reads it
    from autoft.config import SearchConfig
    from autoft.recipe import Recipe

__all__ = [
    "Batch",
    "Dataset",
    "Deployable",
    "InputSpec",
    "LoadedModel",
    "MappedSplit",
    "ModelInputs",
    "Split",
    "Task",
    "TensorSplit",
    "batches",
    "cross_entropy_score",
    "pickled_by_path",
    "take_rows",
]


class Split(Protocol):
    """One split of labelled examples, in a fixed order: ``labels`` ``(N,)`` int64, ``len(split) == N``."""

    labels: torch.Tensor

    def __len__(self) -> int: ...


# What a model's forward takes: one tensor (images, vectors) or named tensors (token ids, attention mask, ...).
ModelInputs = torch.Tensor | Mapping[str, torch.Tensor]
# A batch as a task's `batches` yields it, still on the CPU: (stored inputs the task turns into model inputs, labels).
Batch = tuple[ModelInputs, torch.Tensor]
# What a task needs to turn stored examples into model inputs (image size, mean, std, ...): hashable, so data
# read once for one spec is shared by every model with the same spec.
InputSpec = Hashable


@dataclass(frozen=True)
class TensorSplit:
    """A split held as one tensor of inputs ``(N, ...)`` and labels ``(N,)`` (decoded images, cached features).

    >>> s = TensorSplit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))
    >>> len(s)
    2
    """

    images: torch.Tensor  # the inputs; named for the first task (images), also holds features and activations
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_BY_PATH: ContextVar[bool] = ContextVar("autoft_mapped_by_path", default=False)


@dataclass(frozen=True)
class MappedSplit(TensorSplit):
    """A :class:`TensorSplit` whose inputs are a ``.npy`` file mapped copy-on-write (the decoded-data cache).

    Pickled like any split (its contents), except inside :func:`pickled_by_path`: there as the file's path, and
    unpickled by mapping that file again, so processes on one machine (a local Ray's workers) share its pages in
    the page cache instead of each holding a copy.
    """

    path: Path | None = None

    def __reduce__(self) -> tuple:
        if _BY_PATH.get() and self.path is not None:
            return _map_split, (str(self.path), self.labels)
        return TensorSplit, (self.images, self.labels)


def _map_split(path: str, labels: torch.Tensor) -> MappedSplit:
    return MappedSplit(pages.mapped(path), labels, Path(path))


@contextmanager
def pickled_by_path(enabled: bool = True) -> Iterator[None]:
    """Within it, :class:`MappedSplit` pickles as its file's path: only for readers on this machine."""
    token = _BY_PATH.set(enabled)
    try:
        yield
    finally:
        _BY_PATH.reset(token)


@dataclass(frozen=True)
class Dataset:
    """A task's data: class names (label ``i`` is ``classes[i]``) and its splits, read once per search.

    ``source`` is what the user named (a folder or a file); ``skipped`` counts unreadable examples; ``spec``
    is the input spec the splits were read for (``image_size`` for images).
    """

    classes: tuple[str, ...]
    train: Split  # of the task's own kind
    val: Split
    test: Split | None
    root: Path
    skipped: int
    image_size: int = 0  # the working resolution of an image task (0 for other tasks)
    inputs: str = ""  # how examples became inputs, for the plan (text: the max_length chosen from the data)
    cache_entry: Path | None = None  # the decoded-data cache entry the splits came from (None: not cached)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and reports.

        >>> ds.summary()["classes"]  # doctest: +SKIP
        5
        """
        out = {
            "classes": len(self.classes),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test) if self.test is not None else 0,
        }
        if self.image_size:
            out["image_size"] = self.image_size
        return out | {"skipped": self.skipped}


@dataclass(frozen=True)
class Deployable:
    """A tuned model as a deployable file (ONNX, TorchScript) sees it, and how to check the file against it.

    ``module`` takes the tensors of ``example`` as positional arguments, in order, and returns logits;
    ``dynamic`` names the axes that may vary (``{"input_ids": {0: batch, 1: sequence}}``, shared ``Dim`` objects
    for axes that must match); ``check`` are other inputs (another batch size and length, so a shape fixed by
    tracing shows up) and ``expected`` the PyTorch model's logits for them; ``meta`` travels in the file.
    """

    module: nn.Module
    example: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, Any]]
    check: dict[str, torch.Tensor]
    expected: torch.Tensor
    meta: dict[str, Any]


@dataclass
class LoadedModel:
    """An exported model loaded back: the network (eval mode, on ``device``), its classes and ``config.json``.

    A task may return a subclass that also predicts from raw inputs (the image task's ``TunedModel``) and that
    can be written as a deployable file (:meth:`deployable`).
    """

    model: nn.Module
    classes: tuple[str, ...]
    meta: dict[str, Any]
    device: torch.device

    def deployable(self, examples: Any = None) -> Deployable:
        """The model as ``autoft export`` writes it, checked on ``examples`` (raw inputs; None: the task's own)."""
        raise AutoftError(
            f"Exporting a {self.meta.get('task')} model to a deployable file is not supported; "
            "export covers image, text and ner models."
        )


PREFETCH = 2  # shuffled batches of a mapped split gathered ahead of the one training


def batches(
    split: TensorSplit,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Yield ``(inputs, labels)`` batches covering a :class:`TensorSplit` once (one epoch).

    With ``shuffle`` the order comes from ``generator`` (same generator state, same order), and the batches of a
    split mapped from a file are gathered ``PREFETCH`` ahead in a background thread; without it, batches are views
    in stored order.

    >>> s = TensorSplit(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.arange(5))
    >>> [len(y) for _, y in batches(s, batch_size=2, shuffle=False)]
    [2, 2, 1]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AutoftError(f"batch_size must be a positive integer, but got {batch_size!r}.")
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            view = split.images[start : start + batch_size]
            yield view, split.labels[start : start + batch_size]
            pages.touched(split.images, view.nbytes)  # read by now
        return
    order = torch.randperm(n, generator=generator)

    def gather(start: int) -> Batch:
        rows = order[start : start + batch_size].to(split.labels.device)
        return take_rows(split.images, rows), split.labels.index_select(0, rows)

    starts = range(0, stop, batch_size)
    if not pages.is_mapped(split.images):
        yield from map(gather, starts)
        return
    # A mapped file (past the memory bound) may have to come from the disk: the next PREFETCH batches are gathered
    # in a background thread while this one trains (numpy copies without the GIL, so reading overlaps computing).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoft-prefetch") as pool:
        ahead = deque(pool.submit(gather, start) for start in starts[:PREFETCH])
        for start in starts[PREFETCH:]:
            batch = ahead.popleft().result()
            ahead.append(pool.submit(gather, start))
            yield batch
        while ahead:
            yield ahead.popleft().result()


def take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor[rows]`` as a new contiguous tensor. A uint8 CPU tensor (decoded images, in memory or mapped) is
    gathered by numpy: torch's ``index_select`` on uint8 rows measured 20-100x slower (e.g. 126 ms against 6 ms
    for 64 images at 224 px; 3.7 s against 0.03 s for a 320-image split out of a mapped cache file).

    >>> take_rows(torch.arange(6, dtype=torch.uint8).view(3, 2), torch.tensor([2, 0])).tolist()
    [[4, 5], [0, 1]]
    """
    if tensor.device.type == "cpu" and tensor.dtype == torch.uint8:
        source, order = tensor.numpy(), rows.cpu().numpy()
        step = max(1, pages.WINDOW // max(pages.GRAIN, source[0].nbytes)) if len(source) else 1
        if len(order) <= step or not pages.is_mapped(tensor):
            out = source[order]  # one gather: numpy's fancy indexing beats np.take(out=) and chunks (0.36 s vs 0.9)
            pages.touched(tensor, out.nbytes, pieces=len(order))
            return torch.from_numpy(out)
        out = np.empty((len(order), *source.shape[1:]), dtype=source.dtype)
        for start in range(0, len(order), step):  # a whole split out of a mapped file: its pages never pile up
            chunk = order[start : start + step]
            out[start : start + len(chunk)] = source[chunk]
            pages.touched(tensor, len(chunk) * source[0].nbytes, pieces=len(chunk))
        return torch.from_numpy(out)
    return tensor.index_select(0, rows.to(tensor.device)).contiguous()


def cross_entropy_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``(N, classes)`` logits against ``(N,)`` labels."""
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


class Task(ABC):
    """What the search core asks of a kind of data. One instance serves a whole search (it holds no state).

    Subclasses set ``name`` (the ``--task`` value) and implement the abstract methods; the rest have defaults
    that suit single-label classification.
    """

    name: str = ""
    score_name: str = "accuracy"  # what ``score`` measures; higher is better
    default_space: str = "default"  # the search-space preset ``--space default`` stands for

    # --- models -----------------------------------------------------------------------------------------------

    @abstractmethod
    def check_model(self, name: str) -> None:
        """Raise :class:`~autoft.errors.AutoftError` (one sentence, the closest valid names) for a bad model name."""

    @abstractmethod
    def create_model(self, name: str, config: SearchConfig) -> nn.Module:
        """The pretrained model (``config.pretrained``, ``config.weights``) following the model protocol."""

    @abstractmethod
    def input_spec(self, model: nn.Module, config: SearchConfig) -> InputSpec:
        """What turning stored examples into ``model``'s inputs needs (hashable: equal specs share the data)."""

    # --- data -------------------------------------------------------------------------------------------------

    @abstractmethod
    def load_data(self, config: SearchConfig, spec: InputSpec) -> Dataset:
        """Read ``config.data`` into train/val(/test) splits for ``spec``, once; bad input: one clear sentence."""

    @abstractmethod
    def batches(
        self, split: Split, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches covering ``split`` once, on the CPU; ``shuffle`` draws the order from ``generator``."""

    @abstractmethod
    def train_inputs(
        self,
        batch: Batch,
        recipe: Recipe,
        spec: InputSpec,
        *,
        num_classes: int,
        device: torch.device,
        generator: torch.Generator,
    ) -> tuple[ModelInputs, torch.Tensor]:
        """A training batch -> (model inputs, targets) on ``device``, augmented/mixed as ``recipe`` says."""

    @abstractmethod
    def eval_inputs(self, inputs: ModelInputs, spec: InputSpec, *, device: torch.device) -> ModelInputs:
        """Stored inputs -> model inputs on ``device``, with no randomness (evaluation, caches, probes)."""

    def deterministic(self, recipe: Recipe) -> bool:
        """Whether ``recipe`` feeds the model the same inputs for an example every epoch (caches may be used)."""
        return True

    def padded_width(self, split: Split) -> int | None:
        """The sequence length ``split``'s examples are padded to, for tasks whose batches are cut to their longest
        example (text: ``max_length``): cached activations of a sequence are stored that wide. None: every batch
        holds the examples whole (images)."""
        return None

    def eval_order(self, split: Split) -> torch.Tensor | None:
        """An order of ``split``'s examples that makes inference cheaper, for tasks whose batches are cut to their
        longest example (text: by length, so a batch of short examples is not padded to a long one's width); the
        outputs are put back in the split's order. None: as stored (images)."""
        return None

    def select(self, split: Split, rows: torch.Tensor) -> Split:
        """The examples ``rows`` of ``split``, in that order; :class:`TensorSplit` by default."""
        return TensorSplit(take_rows(split.images, rows), split.labels[rows])

    def merged(self, first: Split, second: Split) -> Split:
        """The two splits as one (the refit trains on train + val); :class:`TensorSplit` by default."""
        return TensorSplit(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]))

    # --- scoring ----------------------------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, recipe: Recipe) -> torch.Tensor:
        """The training loss (targets are class indices or, mixed, class probabilities)."""
        return F.cross_entropy(logits, targets, label_smoothing=recipe.label_smoothing)

    def score(self, logits: torch.Tensor, split: Split) -> tuple[float, float]:
        """(mean loss, score) of ``logits`` for the whole ``split``, in its order."""
        return cross_entropy_score(logits, split.labels)

    def per_example(self, logits: torch.Tensor, split: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the report's confusion matrix and gallery of mistakes count: class probabilities ``(M, classes)``,
        true labels ``(M,)`` and the row of ``split`` each belongs to ``(M,)``; by default one per example
        (a per-token task gives one per scored token)."""
        return logits.softmax(1), split.labels.to(logits.device), torch.arange(len(split), device=logits.device)

    # --- outputs ----------------------------------------------------------------------------------------------

    def example_inputs(self, dataset: Dataset, spec: InputSpec, *, device: torch.device, count: int = 1) -> ModelInputs:
        """``count`` model inputs from the val split (timing, latency, export checks)."""
        inputs, _ = next(iter(self.batches(dataset.val, batch_size=count, shuffle=False)))
        return self.eval_inputs(inputs, spec, device=device)

    @abstractmethod
    def export_meta(self, spec: InputSpec) -> dict[str, Any]:
        """What ``config.json`` of an exported model must hold besides the classes to use the model again."""

    def dataset_meta(self, dataset: Dataset) -> dict[str, Any]:
        """What ``config.json`` must also hold about how the data became inputs (text: the max_length chosen)."""
        return {}

    @abstractmethod
    def spec_from_meta(self, meta: dict[str, Any]) -> InputSpec:
        """The input spec back from an exported model's ``config.json`` (the inverse of :meth:`export_meta`)."""

    @abstractmethod
    def load_tuned(
        self, directory: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> LoadedModel:
        """An exported model loaded back, ready to predict (a :class:`LoadedModel`, or the task's subclass)."""

    def example_html(self, split: Split, rows: list[int]) -> list[str]:
        """A small HTML rendering of each example ``rows`` of ``split``, for the report's gallery of mistakes."""
        return [f"example {row}" for row in rows]
