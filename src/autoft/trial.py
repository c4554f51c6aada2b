"""One fine-tuning run: setup -> (train epoch -> evaluate -> report -> stop?) -> best epoch's weights.

This module never imports optuna or ray. Its only link to a search backend is ``report(epoch, metrics)``,
which answers "should this trial stop now?" (pruning), and an optional ``stop`` event (Ctrl-C / SIGTERM),
checked before every step. A loss that becomes NaN/inf ends the trial as diverged (not an exception:
the epochs before it are real measurements). Read it top to bottom in one pass.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoft import adapters, blocks, features, optim
from autoft.recipe import PEFT_MODES, Recipe
from autoft.stretch import StepFit
from autoft.tasks import base
from autoft.tasks.base import InputSpec, Split, Task

if TYPE_CHECKING:  # the setup module imports this one to train
    from autoft.preparation import Setup

__all__ = ["EpochMetrics", "Report", "TrialOutcome", "evaluate", "predict_logits", "resolve_device", "run_trial"]

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
    non-finite; ``interrupted``: stopped by the ``stop`` event mid-epoch; ``notes``: extra facts for the record;
    ``best_state``: the best epoch's weights as the plain base model holds them (LoRA merged in);
    ``adapter_state``: for parameter-efficient modes, the best epoch's trained parameters alone (peft's names).
    """

    best_score: float
    best_epoch: int
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    diverged: str = ""
    interrupted: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # a plain model's (LoRA merged)
    adapter_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # PEFT modes: what trained


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
    setup: Setup,
    recipe: Recipe,
    *,
    seed: int,
    report: Report | None = None,
    stop: threading.Event | None = None,
    keep_last: bool = False,
    deadline: float | None = None,
    fill_until: float | None = None,
    validation_seconds: float = 0.0,
) -> TrialOutcome:
    """Fine-tune a copy of ``setup.base_model`` on ``setup.dataset`` with ``recipe``; ``report`` may stop it.

    An epoch is a pass over train, or with ``recipe.epoch_examples`` N a round of the next N examples of
    successive shuffled passes (the budget's choice when a pass does not fit); either is followed by validation.
    ``report(epoch, metrics)`` after each epoch answers "stop now?" (pruning; None never stops). ``stop``, once
    set, ends the trial before its next step (``outcome.interrupted``). The setup's feature cache lets head-only
    epochs on deterministic inputs train the classifier on cached pooled features; its prefix cache lets partial
    fine-tuning epochs run only the unfrozen blocks, on the cached activations entering them (and head-only epochs
    the head alone, when there are no pooled features to cache: NER's per-token head). ``keep_last`` keeps
    the last epoch's weights instead of the best epoch's (a refit on train+val has no held-out split left).
    ``deadline`` (a ``time.time()`` reading: when training must end) cuts the epoch of a trial that already has a
    best epoch before its next step once passed, validates the part trained, and ends the trial (noted
    ``stopped_by_budget``): an epoch slower than planned, because the machine got busier, does not carry the search
    past its budget, and a last epoch the runner lets start when only a part of one fits uses the time left.
    ``fill_until`` (a ``time.time()`` reading; the search's last trial) fits the trial's steps to end training then,
    from its measured pace and ``validation_seconds`` per validation (:class:`~autoft.stretch.StepFit`).

    >>> outcome = run_trial(setup, Recipe(epochs=2), seed=0)  # doctest: +SKIP
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    task, dataset, device = setup.task, setup.dataset, setup.device
    model = copy.deepcopy(setup.base_model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    feature_cache, prefix_cache = setup.feature_cache, setup.prefix_cache
    if feature_cache is not None and feature_cache.base_model is not setup.base_model:
        feature_cache = None  # features of another model: not ours to use
    if prefix_cache is not None and prefix_cache.base_model is not setup.base_model:
        prefix_cache = None
    steps_per_epoch = math.ceil((recipe.epoch_examples or len(dataset.train)) / recipe.batch_size)
    total_steps, warmup_steps = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    fit = None
    if fill_until is not None:
        fit = StepFit(recipe.epochs, total_steps, recipe.warmup_epochs, until=fill_until, validation=validation_seconds)
    outcome = TrialOutcome(best_score=-math.inf, best_epoch=-1)
    trainable, optimizer, step, stream = object(), None, 0, None
    for epoch in range(recipe.epochs):
        if recipe.train_blocks_at(epoch) != trainable:  # LP-FT unfreezes here; a fresh optimizer follows
            stream = None  # epochs of N examples: the inputs change (cached or not), so does the stream of passes
            trainable = recipe.train_blocks_at(epoch)
            blocks.apply_freeze(model, train_blocks=trainable)
            policy = adapters.policy(recipe)
            if policy is not None:  # BitFit, norm, LoRA (injected here) or a registered piece chooses what trains
                policy(model, recipe)
            optimizer = optim.create_optimizer(model, recipe)
            outcome.notes["trainable_params"] = blocks.count_parameters(model, trainable_only=True)  # a study attr
            # Same inputs every epoch and a frozen backbone prefix; a policy may train inside any block: no caches.
            steady = policy is None and task.deterministic(recipe)
            # Head only: the classifier trains on pooled features computed once per search.
            head_only = feature_cache is not None and steady and trainable == 0
            head_only = head_only and _cache_pays(recipe, dataset, built=feature_cache.built() is not None)
            cached = feature_cache.splits() if head_only else None
            net = model.get_classifier() if cached else model
            # A frozen prefix: only the trainable blocks run, on activations cached per search. Head only without
            # pooled features (NER's per-token head) or when the feature cache refused: the prefix is every block.
            partial = (bool(trainable) or (trainable == 0 and not cached)) and steady and prefix_cache is not None
            partial = partial and _cache_pays(recipe, dataset, built=prefix_cache.built(train_blocks=trainable))
            suffix = prefix_cache.for_trial(model, train_blocks=trainable) if partial else None
            if suffix is not None:
                net, cached = suffix[0], suffix[1:]
            forward = torch.compile(net) if setup.compile else net
            if fit is not None:  # fitted while more than the head trains (LP-FT's probe keeps its planned steps)
                fit.retime(active=trainable != 0)
        started = time.perf_counter()
        blocks.set_train_mode(model, freeze_bn_stats=recipe.freeze_bn_stats)
        train_loss_sum, seen = torch.zeros((), device=device), 0
        one_pass = functools.partial(
            base.batches if cached else task.batches, cached[0] if cached else dataset.train,
            batch_size=recipe.batch_size, shuffle=True, generator=generator,
        )  # fmt: skip
        if recipe.epoch_examples or fit:  # an epoch of N examples: the next steps of successive shuffled passes
            stream = stream or _passes(one_pass)
            train_batches = stream if fit else itertools.islice(stream, steps_per_epoch)  # a fit ends epochs itself
        else:
            train_batches = one_pass()
        cut_short = False  # the deadline passed mid-epoch: the part trained so far is validated, then the trial ends
        if fit is not None:
            fit.start_epoch(step)
        for batch in train_batches:
            if stop is not None and stop.is_set():  # a flag read, no device sync
                outcome.interrupted = outcome.stopped_early = True
                return outcome
            if deadline is not None and outcome.best_epoch >= 0 and time.time() > deadline:  # keeps its best epoch
                cut_short = outcome.stopped_early = True
                break
            if fit is not None:
                total_steps, warmup_steps = fit.total, fit.warmup_steps
            optim.set_lr(
                optimizer,
                recipe.lr
                * optim.lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=recipe.schedule),
            )
            if cached:
                inputs, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            else:
                inputs, targets = task.train_inputs(
                    batch, recipe, setup.spec, num_classes=len(dataset.classes), device=device, generator=generator
                )
            with _autocast(device):
                loss = task.loss(forward(inputs), targets, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss_sum += loss.detach() * len(batch[1])  # stays on the device: no per-step host sync
            step, seen = step + 1, seen + len(batch[1])
            if fit is not None:
                fit.after_step(step, epoch)
                if step >= fit.epoch_end(epoch):
                    break
        if cut_short:
            outcome.notes["stopped_by_budget"] = (
                f"{epoch + 1} of {recipe.epochs} epochs, the last cut at the deadline after {seen} examples"
                if seen
                else f"{epoch} of {recipe.epochs} epochs (the deadline passed mid-epoch)"
            )
            if not seen:  # nothing trained since the last validation
                return outcome
        train_loss = train_loss_sum.item() / max(1, seen)  # one host sync per epoch
        if not math.isfinite(train_loss):  # diverged: more epochs cannot recover it
            outcome.diverged = (
                f"training loss became {train_loss} in epoch {epoch + 1} (learning rate {recipe.lr:.2e} too high?)"
            )
            outcome.stopped_early = True
            break
        validating = time.perf_counter()
        if cached:  # the head or the suffix on cached inputs; the whole model in eval mode, as evaluate() does
            logits = features.cached_logits(model, net, cached[1], device=device)
            val_loss, val_accuracy = task.score(logits, dataset.val)
        else:
            val_loss, val_accuracy = evaluate(model, dataset.val, setup)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - started)
        outcome.history.append(metrics)
        if val_accuracy > outcome.best_score or keep_last:
            outcome.best_score, outcome.best_epoch = val_accuracy, epoch
            outcome.best_state = adapters.plain_state(model)  # LoRA merged: what leaves a trial is a plain model
            if recipe.freeze in PEFT_MODES:
                outcome.adapter_state = adapters.adapter_state(model)
        log.debug("epoch %d: %s", epoch, metrics)
        if fit is not None:
            fit.after_epoch(step, epoch, validation_seconds=time.perf_counter() - validating)
            if fit.fitted:
                outcome.notes |= {"fitted_steps": fit.total, "planned_steps": fit.planned}
        if (report is not None and report(epoch, metrics)) or cut_short:
            outcome.stopped_early = outcome.stopped_early or epoch < recipe.epochs - 1
            break
    return outcome


def _cache_pays(recipe: Recipe, dataset: base.Dataset, *, built: bool) -> bool:
    """Whether to use a cache of frozen computation, whose build is one frozen forward pass over train + val:
    always once built, or when the epochs are passes (each repeats that forward pass); with epochs of N examples
    (a short budget's rounds) only when the trial's epochs and validations cover as many examples. E.g. the
    demo's 30 s search: 3 rounds of 86 images would have paid a prefix pass over all 1,437 first."""
    if built or not recipe.epoch_examples:
        return True
    return recipe.epochs * (recipe.epoch_examples + len(dataset.val)) >= len(dataset.train) + len(dataset.val)


def _passes(one_pass: Callable[[], Iterator[base.Batch]]) -> Iterator[base.Batch]:
    """Batches of successive passes (each shuffled anew by ``one_pass``), without end; none for an empty split."""
    while True:
        empty = True
        for batch in one_pass():
            empty = False
            yield batch
        if empty:
            return


def evaluate(model: nn.Module, split: Split, setup: Setup, *, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, score) of ``model`` on ``split``, as the setup's task scores it (accuracy for images).

    >>> loss, accuracy = evaluate(model, setup.dataset.val, setup)  # doctest: +SKIP
    """
    logits = predict_logits(model, split, setup.task, setup.spec, device=setup.device, batch_size=batch_size)
    return setup.task.score(logits, split)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: Split, task: Task, spec: InputSpec, *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Logits (float32, on ``device``) of ``model`` for every example of ``split``, in order, in eval mode."""
    was_training = model.training
    model.eval()
    outputs = []
    for rows, inputs in features.model_inputs(task, split, spec, device=device, batch_size=batch_size):
        with _autocast(device):
            outputs.append((rows, model(inputs).float()))
    model.train(was_training)
    return features.in_split_order(outputs, len(split))
