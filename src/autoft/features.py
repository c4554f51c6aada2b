"""Frozen-feature cache: the pooled pre-logits features of train and val, computed once per search.

When only the classifier trains (a linear probe, LP-FT's head-only epochs) on deterministic inputs
(``task.deterministic``; for images: augment "none", no mixup or cutmix), everything before the classifier is
a fixed function of the example: frozen layers run in eval mode (``blocks.set_train_mode``). So
``forward_head(forward_features(x), pre_logits=True)`` is computed once, on first use, and shared by every trial
of the search; those trials train ``model.get_classifier()`` alone on it. A linear probe then costs one forward
pass over the data per search instead of one per epoch per trial. The batches come from the same
``tasks.base.batches`` call with the same generator, so results equal the uncached path within float tolerance
(tests/test_features.py). Any task whose models have ``forward_features``/``forward_head`` gets it.

Memory bound: (train + val images) x ``num_features`` x 4 bytes (2 under bf16 autocast), kept on the
device, e.g. 1,437 digits x 1,280 (efficientnet_lite0) = 7 MB, 100,000 images x 2,048 (resnet50) = 820 MB.
Past ``max_bytes`` (default 2 GiB) the cache is not built and trials take the uncached path; pooled
features are this small, so there is no spill to disk. Partial freezing (the feature maps after a frozen
prefix of blocks) has its own cache, with a disk spill: ``prefix.PrefixCache``.

The probe computes the features of a bounded sample for its linear probe and hands them over (``adopt``): the
build then computes only the other rows, so the probe's forward pass is not paid twice (until then the sample's
features are held: at most 1,536 x ``num_features``, e.g. 8 MB for a width of 1,280).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from autoft.tasks.base import Dataset, InputSpec, Task, TensorSplit

__all__ = [
    "FeatureCache",
    "autocast",
    "cached_logits",
    "in_eval_mode",
    "in_split_order",
    "model_inputs",
    "pool",
    "pooled",
    "unsteady",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 2**30


def model_inputs(
    task: Task, split: object, spec: InputSpec, *, device: torch.device, batch_size: int
) -> Iterator[tuple[torch.Tensor, object]]:
    """``(rows, inputs)`` covering every example of ``split`` once, ``batch_size`` at a time, in the task's
    evaluation order (:meth:`~autoft.tasks.base.Task.eval_order`; text: by length, so a batch is cut to a width its
    examples nearly share); ``rows`` are the examples' positions in ``split``. No randomness."""
    order = task.eval_order(split)
    source = split if order is None else task.select(split, order)
    start = 0
    for inputs, labels in task.batches(source, batch_size=batch_size, shuffle=False):
        end = start + len(labels)
        rows = torch.arange(start, end) if order is None else order[start:end]
        yield rows, task.eval_inputs(inputs, spec, device=device)
        start = end


def in_split_order(outputs: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int) -> torch.Tensor:
    """The ``(rows, output)`` batches of :func:`model_inputs` as one tensor of ``count`` rows in the split's order;
    an output narrower than the widest (token logits of a batch cut to its longest example) is zero-padded after
    its width (positions past every example of its batch, which no score reads)."""
    placed = list(outputs)
    if not placed:
        return torch.zeros(0)
    widest = [max(output.shape[d] for _, output in placed) for d in range(1, placed[0][1].ndim)]
    out = placed[0][1].new_zeros((count, *widest))
    for rows, output in placed:
        out[(rows.to(out.device), *(slice(0, size) for size in output.shape[1:]))] = output
    return out


@dataclass
class FeatureCache:
    """Pooled pre-logits features of ``dataset``'s train and val splits under ``base_model``, built on first use.

    >>> cache = FeatureCache(model, ds, task, spec, device=torch.device("cpu"))  # doctest: +SKIP
    >>> train, val = cache.splits()  # doctest: +SKIP
    >>> train.images.shape  # (N, num_features) float features, labels as in ds.train  # doctest: +SKIP
    torch.Size([1077, 1280])
    """

    base_model: nn.Module
    dataset: Dataset
    task: Task
    spec: InputSpec
    device: torch.device
    max_bytes: int = DEFAULT_MAX_BYTES
    batch_size: int = 256
    _splits: tuple[TensorSplit, TensorSplit] | None = field(default=None, init=False, repr=False)
    _refused: str = field(default="", init=False)
    _known: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes the cached features hold (0 before the first use or when refused)."""
        return sum(s.images.numel() * s.images.element_size() for s in self._splits or ())

    def adopt(self, split: str, rows: torch.Tensor, features: torch.Tensor) -> None:
        """Take the pooled features of ``rows`` of the ``"train"`` or ``"val"`` split, already computed with this
        cache's model in eval mode (the probe's sample): the build then computes only the other rows. Ignored once
        built or refused; dropped when the build refuses."""
        if self._splits is None and not self._refused:
            self._known[split] = (rows.cpu(), features.detach())

    def built(self) -> tuple[TensorSplit, TensorSplit] | None:
        """``(train, val)`` when something already built them; never builds (the probe samples them if there)."""
        return self._splits

    def splits(self) -> tuple[TensorSplit, TensorSplit] | None:
        """``(train, val)`` with ``images`` = float features ``(N, D)`` on the device; None when not cacheable."""
        if self._splits is None and not self._refused:
            self._refused = _why_not_cacheable(self.base_model)
            if not self._refused:
                self._build()
            if self._refused:
                log.info("feature cache off: %s; head-only trials: the prefix cache or the whole model", self._refused)
            self._known.clear()  # used or refused: not kept beside the cache
        return self._splits

    def _build(self) -> None:
        model = copy.deepcopy(self.base_model).to(self.device).eval()  # the trial's copy, as the trial makes it
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        train, val = self.dataset.train, self.dataset.val
        probe = self.task.example_inputs(self.dataset, self.spec, device=self.device, count=2)
        mismatch = _forward_mismatch(model, probe)
        if mismatch:
            self._refused = mismatch
            return
        width = self._pool(model, probe).shape[1]
        need = (len(train) + len(val)) * width * 4
        if need > self.max_bytes:
            self._refused = (
                f"features would take {need / 2**20:.0f} MiB, over the {self.max_bytes / 2**20:.0f} MiB bound"
            )
            return
        self._splits = tuple(  # type: ignore[assignment]
            TensorSplit(self._features(model, name, split), split.labels.to(self.device))
            for name, split in (("train", train), ("val", val))
        )
        log.info(
            "feature cache: %d x %d pooled features, %.1f MiB on %s",
            len(train) + len(val),
            width,
            self.nbytes / 2**20,
            self.device,
        )

    def _features(self, model: nn.Module, name: str, split: object) -> torch.Tensor:
        """Every example's features in order: the adopted rows as given, the rest computed here."""
        if name not in self._known:
            return self._pooled(model, split)
        rows, known = self._known[name]
        missing = torch.ones(len(split), dtype=torch.bool)
        missing[rows] = False
        out = torch.empty((len(split), known.shape[1]), dtype=known.dtype, device=self.device)
        out[rows.to(self.device)] = known.to(self.device)
        if missing.any():
            others = missing.nonzero().flatten()
            out[others.to(self.device)] = self._pooled(model, self.task.select(split, others)).to(known.dtype)
        return out

    def _pooled(self, model: nn.Module, split: object) -> torch.Tensor:
        return pooled(model, self.task, split, self.spec, device=self.device, batch_size=self.batch_size)

    def _pool(self, model: nn.Module, inputs: object) -> torch.Tensor:
        return pool(model, inputs, device=self.device)


@torch.no_grad()  # not inference_mode: the head's backward saves these features as its input
def pool(model: nn.Module, inputs: object, *, device: torch.device) -> torch.Tensor:
    """The pooled pre-logits features ``forward_head(forward_features(x), pre_logits=True)`` of a batch."""
    with autocast(device):
        return model.forward_head(model.forward_features(inputs), pre_logits=True)


def pooled(
    model: nn.Module, task: Task, split: object, spec: InputSpec, *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """The pooled features of every example of ``split``, in order (``model`` in the mode the caller set)."""
    inputs = model_inputs(task, split, spec, device=device, batch_size=batch_size)
    return in_split_order(((rows, pool(model, batch, device=device)) for rows, batch in inputs), len(split))


@torch.no_grad()
def cached_logits(
    model: nn.Module, net: nn.Module, split: TensorSplit, *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Logits of ``net`` (the head, or the suffix of a split model) on cached inputs, with ``model`` in eval mode
    as ``trial.evaluate`` puts it; float32 on ``device``, in the split's order."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        with autocast(device):
            out.append(net(split.images[start : start + batch_size].to(device, non_blocking=True)).float())
    model.train(was_training)
    return torch.cat(out)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA GPUs that support it; full precision elsewhere (CPU autocast is slower here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _why_not_cacheable(model: nn.Module) -> str:
    """Why the features before the classifier would differ between epochs or from the trial's forward ('' if none).

    Stochastic modules (dropout, drop-path) stay in train mode in a head-only trial (they have no frozen
    parameters); a norm layer without parameters would still update its running statistics.
    """
    if not all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head")):
        return f"{type(model).__name__} has no forward_features/forward_head"
    if not isinstance(model.get_classifier(), nn.Module):
        return "get_classifier() is not one module"
    if getattr(model, "drop_rate", 0.0):
        return f"the model has drop_rate={model.drop_rate}"
    frozen = _frozen_in_head_only(model)  # str.startswith(()) is False: with none, every module is checked
    modules = ((name, module) for name, module in model.named_modules() if not name.startswith(frozen))
    return next(filter(None, (unsteady(name, module) for name, module in modules)), "")


def _frozen_in_head_only(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes (``"encoder."``) of the modules a head-only trial puts in eval mode. Dropout inside them is
    off, so it cannot make features vary (a transformer encoder's dropout; timm's drop-path inside frozen blocks)."""
    return in_eval_mode(model, trainable={id(p) for p in model.get_classifier().parameters()})


def in_eval_mode(model: nn.Module, *, trainable: set[int]) -> tuple[str, ...]:
    """Name prefixes (``"encoder."``) of the modules ``blocks.set_train_mode`` puts in eval mode, with everything in
    them, when the parameters ``trainable`` (ids) train and the others are frozen: those with parameters, all
    frozen."""
    return tuple(
        f"{name}."
        for name, module in model.named_modules()
        if name and (params := list(module.parameters())) and not any(id(p) in trainable for p in params)
    )


def unsteady(name: str, module: nn.Module) -> str:
    """Why ``module`` alone would not give the same output every epoch ('' if it would): dropout and drop-path
    stay active in train mode, and a norm layer without parameters keeps updating its running statistics."""
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"{name} is dropout with p={module.p}"
    if getattr(module, "drop_prob", 0.0):
        return f"{name} drops paths with p={module.drop_prob}"
    if isinstance(getattr(module, "running_mean", None), torch.Tensor) and not list(module.parameters()):
        return f"{name} updates running statistics without parameters"
    return ""


@torch.no_grad()
def _forward_mismatch(model: nn.Module, probe: torch.Tensor) -> str:
    """'' when classifier(pre-logits features) equals the model's own forward on ``probe`` (eval mode, fp32)."""
    direct = model(probe)
    via_features = model.get_classifier()(model.forward_head(model.forward_features(probe), pre_logits=True))
    if direct.shape != via_features.shape or not torch.allclose(direct, via_features, rtol=1e-4, atol=1e-5):
        return "get_classifier()(forward_head(..., pre_logits=True)) differs from the model's forward"
    return ""
