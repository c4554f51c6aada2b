"""One fine-tuning run: setup -> (train epoch -> evaluate -> report -> stop?) -> best epoch's weights.

This module never imports optuna or ray. Its only link to a search backend is ``report(epoch, metrics)``,
which answers "should this trial stop now?" (pruning), and an optional ``stop`` event (Ctrl-C / SIGTERM),
checked before every step. A loss that becomes NaN/inf ends the trial as diverged (not an exception:
the epochs before it are real measurements). Read it top to bottom in one pass.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoft import data, features, models, optim, pieces, prefix
from autoft.recipe import Recipe

__all__ = ["EpochMetrics", "Report", "TrialOutcome", "evaluate", "resolve_device", "run_trial"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; ``val_accuracy`` is the score searches maximize."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


Report = Callable[[int, EpochMetrics], bool]


@dataclass
class TrialOutcome:
    """A finished (or stopped) trial: its best epoch's score and weights, and every epoch's metrics.

    ``stopped_early``: ended before its last epoch (pruned or diverged); ``diverged``: why the loss went
    non-finite; ``interrupted``: stopped by the ``stop`` event mid-epoch; ``notes``: extra facts for the record.
    """

    best_score: float
    best_epoch: int
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    diverged: str = ""
    interrupted: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_autocast = features.autocast  # bf16 on CUDA GPUs that support it; full precision elsewhere


def run_trial(
    base_model: nn.Module,
    recipe: Recipe,
    dataset: data.Dataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int,
    report: Report,
    stop: threading.Event | None = None,
    feature_cache: features.FeatureCache | None = None,
    prefix_cache: prefix.PrefixCache | None = None,
    compile_model: bool = False,
    keep_last: bool = False,
) -> TrialOutcome:
    """Fine-tune a copy of ``base_model`` with ``recipe``; ``report`` after each epoch may stop it.

    ``stop``, once set, ends the trial before its next step (``outcome.interrupted``). ``feature_cache``
    (built for this ``base_model`` and ``dataset``) lets head-only epochs on deterministic inputs train the
    classifier on cached pooled features; ``prefix_cache`` (likewise) lets partial fine-tuning epochs run only the
    unfrozen blocks, on the cached activations entering them. ``compile_model`` runs the training forward through
    ``torch.compile``. ``keep_last`` keeps the last epoch's weights instead of the best epoch's (a refit on train+val
    has no held-out split left to choose an epoch by).

    >>> outcome = run_trial(model, Recipe(epochs=2), ds, mean=m, std=s, device=cpu, seed=0,
    ...                     report=lambda epoch, metrics: False)  # doctest: +SKIP
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base_model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if feature_cache is not None and feature_cache.base_model is not base_model:
        feature_cache = None  # features of another model: not ours to use
    if prefix_cache is not None and prefix_cache.base_model is not base_model:
        prefix_cache = None
    steps_per_epoch = math.ceil(len(dataset.train) / recipe.batch_size)
    total_steps, warmup_steps = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    outcome = TrialOutcome(best_score=-math.inf, best_epoch=-1)
    trainable, optimizer, step = object(), None, 0
    for epoch in range(recipe.epochs):
        if recipe.train_blocks_at(epoch) != trainable:  # LP-FT unfreezes here; a fresh optimizer follows
            trainable = recipe.train_blocks_at(epoch)
            models.apply_freeze(model, train_blocks=trainable)
            custom_freeze = pieces.get("freeze", recipe.freeze)
            if custom_freeze is not None:  # a registered policy freezes what it wants of a fully trainable model
                custom_freeze.fn(model, recipe)
            optimizer = optim.create_optimizer(model, recipe)
            # Head only, same input every epoch: the classifier trains on pooled features computed once per search.
            head_only = trainable == 0 and custom_freeze is None and features.deterministic_inputs(recipe)
            cached = feature_cache.splits() if feature_cache is not None and head_only else None
            net = model.get_classifier() if cached else model
            # A frozen prefix, same input every epoch: only the trainable blocks run, on activations cached per search.
            partial = bool(trainable) and custom_freeze is None and features.deterministic_inputs(recipe)
            suffix = prefix_cache.for_trial(model, train_blocks=trainable) if partial and prefix_cache else None
            if suffix is not None:
                net, cached = suffix[0], suffix[1:]
            forward = torch.compile(net) if compile_model else net
            train_split = cached[0] if cached else dataset.train
        started = time.perf_counter()
        models.set_train_mode(model, freeze_bn_stats=recipe.freeze_bn_stats)
        train_loss_sum = torch.zeros((), device=device)
        for batch, labels in data.batches(train_split, batch_size=recipe.batch_size, shuffle=True, generator=generator):
            if stop is not None and stop.is_set():  # a flag read, no device sync
                outcome.interrupted = outcome.stopped_early = True
                return outcome
            optim.set_lr(
                optimizer,
                recipe.lr
                * optim.lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=recipe.schedule),
            )
            labels = labels.to(device, non_blocking=True)
            inputs, targets = (
                (batch.to(device, non_blocking=True), labels)
                if cached
                else _image_inputs(batch, labels, recipe, dataset, mean, std, device, generator)
            )
            with _autocast(device):
                loss = F.cross_entropy(forward(inputs), targets, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss_sum += loss.detach() * len(labels)  # stays on the device: no per-step host sync
            step += 1
        train_loss = train_loss_sum.item() / len(dataset.train)  # one host sync per epoch
        if not math.isfinite(train_loss):  # diverged: more epochs cannot recover it
            outcome.diverged = (
                f"training loss became {train_loss} in epoch {epoch + 1} (learning rate {recipe.lr:.2e} too high?)"
            )
            outcome.stopped_early = True
            break
        if suffix is not None:
            val_loss, val_accuracy = prefix.evaluate(model, net, cached[1], device=device)
        elif cached:
            val_loss, val_accuracy = features.evaluate_head(net, cached[1], device=device)
        else:
            val_loss, val_accuracy = evaluate(model, dataset.val, mean=mean, std=std, device=device)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - started)
        outcome.history.append(metrics)
        if val_accuracy > outcome.best_score or keep_last:
            outcome.best_score, outcome.best_epoch = val_accuracy, epoch
            outcome.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.debug("epoch %d: %s", epoch, metrics)
        if report(epoch, metrics):
            outcome.stopped_early = epoch < recipe.epochs - 1
            break
    return outcome


def _image_inputs(
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    dataset: data.Dataset,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 CPU batch -> model inputs and targets on ``device``: copied, augmented there, normalized, mixed."""
    if device.type == "cuda":  # page-locked, so the copy runs asynchronously (torch caches pinned blocks)
        images = images.pin_memory()
    images = data.augment(images.to(device, non_blocking=True), recipe.augment, generator=generator)
    inputs = data.normalize(images, mean=mean, std=std)
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if recipe.mixup > 0 or recipe.cutmix > 0:  # soft targets: cross_entropy takes class probabilities
        return data.mix(
            inputs, labels, len(dataset.classes), mixup=recipe.mixup, cutmix=recipe.cutmix, generator=generator
        )
    return inputs, labels


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: data.ImageSet,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``split``.

    >>> loss, accuracy = evaluate(model, ds.val, mean=m, std=s, device=cpu)  # doctest: +SKIP
    """
    logits = predict_logits(model, split.images, mean=mean, std=std, device=device, batch_size=batch_size)
    labels = split.labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Logits (float32, on ``device``) for a uint8 image batch of any size, in eval mode."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device, non_blocking=True)
        with _autocast(device):
            outputs.append(model(data.normalize(chunk, mean=mean, std=std)).float())
    model.train(was_training)
    return torch.cat(outputs)
