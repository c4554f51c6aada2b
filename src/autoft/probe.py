"""Look before searching, part one: what the data looks like and what the pretrained features already do.

:func:`profile_data` counts examples per split and class (nothing is trained). :func:`probe` fits a linear
probe on the pooled pretrained features (the :class:`~autoft.features.FeatureCache` the head-only trials use
anyway) and measures the cost of one epoch: full fine-tuning (a few timed forward+backward+step passes on a copy
of the model, extrapolated to the train split), head-only training and evaluation. Everything goes through the
setup's task, so any task is probed the same way.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoft import blocks, features, optim
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.tasks.base import Dataset, TensorSplit

__all__ = ["DataProfile", "Probe", "probe", "profile_data"]


@dataclass(frozen=True)
class DataProfile:
    """What the data looks like: split sizes, classes, the smallest and largest class, the working resolution.

    >>> DataProfile(train=90, val=30, test=0, classes=3, smallest_class=10, largest_class=50, image_size=224).imbalance
    5.0
    """

    train: int
    val: int
    test: int
    classes: int
    smallest_class: int  # training images of the rarest class
    largest_class: int
    image_size: int
    inputs: str = ""  # how examples became inputs (text: the max_length chosen); '' for images

    @property
    def imbalance(self) -> float:
        """Largest over smallest class size in the train split (1.0 = balanced)."""
        return self.largest_class / max(1, self.smallest_class)

    @property
    def images_per_class(self) -> float:
        return self.train / max(1, self.classes)


def profile_data(dataset: Dataset) -> DataProfile:
    """Count the data set's examples per split and per class.

    >>> profile_data(ds).classes  # doctest: +SKIP
    3
    """
    counts = class_counts(dataset.train.labels, len(dataset.classes))
    return DataProfile(
        train=len(dataset.train),
        val=len(dataset.val),
        test=len(dataset.test) if dataset.test is not None else 0,
        classes=len(dataset.classes),
        smallest_class=int(counts.min()),
        largest_class=int(counts.max()),
        image_size=dataset.image_size,
        inputs=dataset.inputs,
    )


def class_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Examples per class; labels below 0 are not counted (a per-token task marks unscored positions -100).

    >>> class_counts(torch.tensor([[0, -100, 1], [1, 1, -100]]), 3).tolist()
    [1, 3, 0]
    """
    return torch.bincount(labels[labels >= 0].flatten(), minlength=classes)


@dataclass(frozen=True)
class Probe:
    """How well the pretrained features already fit, and what an epoch costs, measured on one model.

    ``linear_probe_accuracy``: val accuracy of a logistic-regression head on the frozen pooled features;
    ``chance``: the accuracy of always guessing the most common val class; ``epoch_seconds_full``: one epoch
    of full fine-tuning over the train split plus the val evaluation; ``epoch_seconds_head``: one head-only
    epoch (on cached features when the cache works); ``eval_seconds_per_image``: inference cost;
    ``seconds``: what the probe itself took (features included).
    """

    linear_probe_accuracy: float
    chance: float
    epoch_seconds_full: float
    epoch_seconds_head: float
    eval_seconds_per_image: float
    seconds: float

    @property
    def fit(self) -> float:
        """The probe's accuracy above chance, as a share of the room above chance (0 = chance, 1 = perfect)."""
        return (self.linear_probe_accuracy - self.chance) / max(1e-9, 1.0 - self.chance)


def probe(setup: Setup, *, seed: int = 0, steps: int = 100, timed_steps: int = 5, batch_size: int = 64) -> Probe:
    """Linear probe on the frozen features and the measured epoch cost, for one prepared model (a ``Setup``).

    The probe trains a fresh linear layer on standardized pooled features for ``steps`` mini-batch steps of
    Adam (seconds even for large data); the epoch cost is the fastest of ``timed_steps`` training steps after one
    warm-up: a step slowed by another process (a test suite, a compile job) must not cap every trial's epochs.
    An estimate too low costs little (the deadline stops the last trial and keeps its best epoch); one too high
    plans short trials for the whole search.

    >>> result = probe(prepare(config))  # doctest: +SKIP
    >>> result.linear_probe_accuracy, result.epoch_seconds_full  # doctest: +SKIP
    (0.91, 12.4)
    """
    started = time.perf_counter()
    dataset = setup.dataset
    counts = class_counts(dataset.val.labels, len(dataset.classes))
    chance = counts.max().item() / max(1, int(counts.sum()))
    head_started = time.perf_counter()
    if _has_pooled_features(setup.base_model):
        train_features, val_features = _pooled_features(setup)
        head_started = time.perf_counter()
        accuracy = _linear_probe(train_features, val_features, len(dataset.classes), seed=seed, steps=steps)
    else:  # no pooled features (per-token outputs): no linear probe; at chance its fit is 0, so no prior fires
        accuracy = chance
    head_seconds = time.perf_counter() - head_started
    eval_per_image = _eval_seconds_per_image(setup, batch_size=batch_size)
    train_per_image = _train_seconds_per_image_fitting(setup, steps=timed_steps, batch_size=batch_size)
    val_seconds = eval_per_image * len(dataset.val)
    cached = setup.feature_cache is not None and setup.feature_cache.splits() is not None
    # Head-only epoch: a pass of the head over cached features (~ the probe's steps), else a frozen forward pass.
    head_epoch = head_seconds / steps * math.ceil(len(dataset.train) / batch_size) if cached else None
    return Probe(
        linear_probe_accuracy=accuracy,
        chance=chance,
        epoch_seconds_full=train_per_image * len(dataset.train) + val_seconds,
        epoch_seconds_head=(head_epoch if head_epoch is not None else eval_per_image * len(dataset.train))
        + (0.0 if cached else val_seconds),
        eval_seconds_per_image=eval_per_image,
        seconds=time.perf_counter() - started,
    )


def _has_pooled_features(model: nn.Module) -> bool:
    return all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head"))


# Without the feature cache the probe computes its own features: on at most this many images (bounded cost).
FALLBACK_TRAIN_IMAGES, FALLBACK_VAL_IMAGES = 10_000, 5_000


def _pooled_features(setup: Setup) -> tuple[TensorSplit, TensorSplit]:
    """Train and val pooled features: the search's feature cache, or (when it refuses, e.g. dropout in the
    model) the same features computed here in eval mode, where dropout is off anyway, on an evenly spread
    subset of each split (every class, bounded cost)."""
    splits = setup.feature_cache.splits() if setup.feature_cache is not None else None
    if splits is not None:
        return splits
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    out = []
    for split, limit in ((setup.dataset.train, FALLBACK_TRAIN_IMAGES), (setup.dataset.val, FALLBACK_VAL_IMAGES)):
        rows = torch.linspace(0, len(split) - 1, min(len(split), limit)).long()  # evenly spread: every class
        subset = setup.task.select(split, rows)
        pooled = features.pooled(model, setup.task, subset, setup.spec, device=setup.device).float()
        out.append(TensorSplit(pooled, subset.labels.to(setup.device)))
    return out[0], out[1]


def _linear_probe(
    train: TensorSplit, val: TensorSplit, num_classes: int, *, seed: int, steps: int, batch_size: int = 512
) -> float:
    """Val accuracy of multinomial logistic regression (Adam, light L2) on standardized features."""
    generator = torch.Generator().manual_seed(seed)
    x_train, x_val = train.images.float(), val.images.float()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(len(x_train), (min(batch_size, len(x_train)),), generator=generator)
            rows = rows.to(x_train.device)
            loss = F.cross_entropy(head(x_train[rows]), train.labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (head(x_val).argmax(1) == val.labels).float().mean().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _eval_seconds_per_image(setup: Setup, *, batch_size: int) -> float:
    """Seconds per example of an eval-mode forward pass (one warm-up batch, the faster of two timed val batches)."""
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    count = min(batch_size, len(setup.dataset.val))
    batch = setup.task.example_inputs(setup.dataset, setup.spec, device=setup.device, count=count)
    with features.autocast(setup.device):
        return _fastest(lambda: model(batch), setup.device, repeats=2) / count


def _train_seconds_per_image_fitting(setup: Setup, *, steps: int, batch_size: int) -> float:
    """As :func:`_train_seconds_per_image`, halving the batch while the device runs out of memory (as trials do)."""
    while True:
        try:
            return _train_seconds_per_image(setup, steps=steps, batch_size=batch_size)
        except torch.OutOfMemoryError:
            if batch_size < 2:
                raise
            batch_size //= 2
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()


def _train_seconds_per_image(setup: Setup, *, steps: int, batch_size: int) -> float:
    """Seconds per example of the fastest full fine-tuning step (forward, backward, AdamW step) on a model copy."""
    model = copy.deepcopy(setup.base_model).to(setup.device)
    blocks.apply_freeze(model, train_blocks=None)
    blocks.set_train_mode(model, freeze_bn_stats=False)
    recipe = Recipe(batch_size=batch_size)
    optimizer = optim.create_optimizer(model, recipe)
    inputs, labels = next(iter(setup.task.batches(setup.dataset.train, batch_size=batch_size, shuffle=False)))
    batch = setup.task.eval_inputs(inputs, setup.spec, device=setup.device)
    labels = labels.to(setup.device)

    def step() -> None:
        with features.autocast(setup.device):
            loss = setup.task.loss(model(batch), labels, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _fastest(step, setup.device, repeats=steps) / len(labels)


def _fastest(run: Callable[[], object], device: torch.device, *, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``run``, after one untimed warm-up call (allocations,
    kernel selection). The fastest, not the mean: another process on the machine only ever slows a call down."""
    fastest = math.inf
    for call in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        fastest = min(fastest, time.perf_counter() - started) if call else fastest
    return fastest
