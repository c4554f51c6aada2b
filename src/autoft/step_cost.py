"""Look before searching, part two: what a training step and an evaluation cost, timed on a copy of the model.

:func:`mode_cost` times a few small training steps (forward, backward, optimizer step) with a recipe's freezing
and extrapolates them per example to an epoch (:class:`ModeCost`, one per freeze mode family: :func:`cost_family`);
:func:`timed_eval` times evaluation batches. :func:`autoft.probe.probe` asks for them only under a ``--timeout``
budget, which plans with them, and a short budget's allowance may leave the optional timings out (the bigger
batch's steps, the evaluation batches): the cheaper bound then stands.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autoft import adapters, blocks, features, optim
from autoft.preparation import Setup
from autoft.recipe import LORA_MODES, Recipe

__all__ = [
    "EVAL_TIMING_BATCH",
    "TIMED_STEPS",
    "TIMING_BATCH",
    "ModeCost",
    "cost_family",
    "eval_seconds_per_image",
    "fastest",
    "mode_cost",
    "step_cost",
    "sync",
    "timed_eval",
    "train_seconds_per_image",
]

log = logging.getLogger(__name__)

# The epoch cost: the fastest of TIMED_STEPS full fine-tuning steps of TIMING_BATCH examples, after one untimed
# warm-up step on WARM_UP_BATCH examples (the first step of a fresh model copy is slow whatever its size: lazy
# initialization, kernel selection, the optimizer's state).
TIMED_STEPS, TIMING_BATCH, WARM_UP_BATCH = 3, 16, 2
# When a step of TIMING_BATCH is this fast, the trials' own batch (RECIPE_BATCH) is timed too and preferred: the
# faster of RECIPE_STEPS steps (a batch-64 step is most of the probe at low resolution: 0.7 s at 24 px on 2 cores).
CHEAP_STEP_SECONDS, RECIPE_BATCH, RECIPE_STEPS = 0.25, 64, 2
# Evaluation is timed on batches of this many examples (a warm-up and two timed).
EVAL_TIMING_BATCH = 64


@dataclass(frozen=True)
class ModeCost:
    """What training with one freeze mode family costs, measured on a model copy (:func:`autoft.probe.probe`).

    ``mode``: the family (:func:`cost_family`); ``timed``: the recipe timed for it, the family's most expensive
    in the space (e.g. LoRA at the largest rank on attention+mlp); ``seconds_per_example`` of a training step;
    ``epoch_seconds``: that over the train split plus the val evaluation; ``trainable`` of ``parameters`` (the
    base model's, adapters not counted); ``peak_bytes``: the device memory the step needed beyond what the process
    already held (``torch.cuda.max_memory_allocated``; None off CUDA).
    """

    mode: str
    timed: str
    seconds_per_example: float
    epoch_seconds: float
    trainable: int
    parameters: int
    peak_bytes: int | None = None


def cost_family(freeze: str) -> str:
    """Which measured cost a freeze mode's epochs have: modes whose steps cost the same share one timing.

    >>> [cost_family(m) for m in ("lp_ft", "lora_bias", "linear_probe", "my_piece")]
    ['full', 'lora', 'head', 'full']
    """
    if freeze in LORA_MODES:
        return "lora"
    if freeze in ("partial", "bitfit", "norm"):
        return freeze
    return "head" if freeze == "linear_probe" else "full"  # lp_ft fine-tunes fully; custom pieces: the safe bound


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def timed_eval(setup: Setup, pooled: float | None, affordable: Callable[[float], bool] | None) -> float:
    """Seconds per example of evaluation: timed (:func:`eval_seconds_per_image`), unless a budget cannot afford
    its three batches (predicted at the pooled pass's pace) and that pace, ``pooled``, stands in for it: the same
    forward pass less the classifier, in bigger batches with the start-up in (a little above, on the safe side)."""
    if pooled is None or affordable is None:
        return eval_seconds_per_image(setup)
    if affordable(3 * EVAL_TIMING_BATCH * pooled):
        return eval_seconds_per_image(setup)
    log.info("evaluation cost: the linear probe's pace (%.4fs per example), not timed", pooled)
    return pooled


@torch.inference_mode()
def eval_seconds_per_image(setup: Setup, *, batch_size: int = EVAL_TIMING_BATCH) -> float:
    """Seconds per example of an eval-mode forward pass (one warm-up batch, the faster of two timed val batches).

    Where evaluation batches examples of similar size together (``Task.eval_order``: text by token count), the
    timed batch is the middle one of that order, as wide as a typical evaluation batch: the first val rows, padded
    to their longest, made a MiniLM val pass look ~1.4x its real cost, and the budget reserved that for every
    validation and the wrap-up."""
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    task, dataset = setup.task, setup.dataset
    count = min(batch_size, len(dataset.val))
    order = task.eval_order(dataset.val)
    if order is not None:
        middle = max(0, (len(order) - count) // 2)
        dataset = dataclasses.replace(dataset, val=task.select(dataset.val, order[middle : middle + count]))
    batch = task.example_inputs(dataset, setup.spec, device=setup.device, count=count)
    with features.autocast(setup.device):
        return fastest(lambda: model(batch), setup.device, repeats=2) / count


def mode_cost(
    setup: Setup, recipe: Recipe, *, val_seconds: float, affordable: Callable[[float], bool] | None = None
) -> ModeCost:
    """The cost of training with ``recipe``'s freeze mode: :func:`step_cost`, halving the batch while the device
    runs out of memory (as trials do), extrapolated to an epoch."""
    batch_size = RECIPE_BATCH
    while True:
        try:
            per_example, trainable, peak = step_cost(setup, recipe, batch_size=batch_size, affordable=affordable)
            break
        except torch.OutOfMemoryError:
            if batch_size < 2:
                raise
            batch_size //= 2
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    return ModeCost(
        mode=cost_family(recipe.freeze),
        timed=recipe.describe().split(",")[0],  # what trains: "full fine-tuning", "LoRA r32 on attention+mlp", ...
        seconds_per_example=per_example,
        epoch_seconds=per_example * len(setup.dataset.train) + val_seconds,
        trainable=trainable,
        parameters=blocks.count_parameters(setup.base_model),
        peak_bytes=peak,
    )


def train_seconds_per_image(setup: Setup, *, batch_size: int) -> float:
    """Seconds per example of a full fine-tuning step (:func:`step_cost` of the default recipe)."""
    return step_cost(setup, Recipe(), batch_size=batch_size)[0]


def step_cost(
    setup: Setup, recipe: Recipe, *, batch_size: int, affordable: Callable[[float], bool] | None = None
) -> tuple[float, int, int | None]:
    """Seconds per example of a training step (forward, backward, AdamW step) with ``recipe``'s freezing (block
    counts, or the mode's policy: LoRA injected, BitFit, norm) on a model copy: the fastest of TIMED_STEPS steps
    of TIMING_BATCH examples, or of ``batch_size`` (the trials' batch) when such small steps are cheap (a GPU)
    and ``affordable`` grants those steps' predicted seconds (a short budget may not: the small steps' pace, an
    overestimate, then stands).
    Also the trainable parameters and, on CUDA, the peak device memory the copy and its steps added (else None).

    Why a small batch is safe: a step's cost per example falls as its batch grows (the same kernels launched once
    for more examples), so extrapolating from a small batch overestimates a batch-64 epoch; the plan then gives
    trials fewer epochs, never more than fit. A trial is then judged by its own pace (``Budget.next_epoch_fits``),
    and the deadline stops the last one with its best epoch kept.
    """
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    held = torch.cuda.memory_allocated(setup.device) if cuda else 0
    model = copy.deepcopy(setup.base_model).to(setup.device)
    blocks.apply_freeze(model, train_blocks=recipe.train_blocks_at(recipe.epochs))  # lp_ft: its fine-tuning phase
    policy = adapters.policy(recipe)
    if policy is not None:  # as a trial does: BitFit, norm, LoRA (injected into the copy) choose what trains
        policy(model, recipe)
    blocks.set_train_mode(model, freeze_bn_stats=recipe.freeze_bn_stats)
    recipe = dataclasses.replace(recipe, batch_size=batch_size)
    optimizer = optim.create_optimizer(model, recipe)

    def step_on(count: int) -> tuple[Callable[[], None], int]:
        """One training step on the first ``count`` train examples (prepared once, outside the timing)."""
        inputs, labels = next(iter(setup.task.batches(setup.dataset.train, batch_size=count, shuffle=False)))
        batch, labels = setup.task.eval_inputs(inputs, setup.spec, device=setup.device), labels.to(setup.device)

        def step() -> None:
            with features.autocast(setup.device):
                loss = setup.task.loss(model(batch), labels, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step, len(labels)

    step_on(min(WARM_UP_BATCH, batch_size))[0]()  # the first step's one-off costs, on as few examples as will do
    step, count = step_on(min(TIMING_BATCH, batch_size))
    per_example = fastest(step, setup.device, repeats=TIMED_STEPS, warm_up=False) / count
    cheap = per_example * count < CHEAP_STEP_SECONDS and batch_size > count
    if cheap and (affordable is None or affordable(RECIPE_STEPS * batch_size * per_example)):  # the trials' batch
        step, count = step_on(batch_size)  # the copy is warm by now: the faster of two steps, no third
        per_example = fastest(step, setup.device, repeats=RECIPE_STEPS, warm_up=False) / count
    peak = torch.cuda.max_memory_allocated(setup.device) - held if cuda else None
    return per_example, blocks.count_parameters(model, trainable_only=True), peak


def fastest(run: Callable[[], object], device: torch.device, *, repeats: int, warm_up: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``run``, after one untimed warm-up call (allocations,
    kernel selection) unless ``warm_up`` is False. The fastest, not the mean: another process on the machine only
    ever slows a call down."""
    fastest = math.inf
    for call in range(repeats + int(warm_up)):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        fastest = min(fastest, time.perf_counter() - started) if call or not warm_up else fastest
    return fastest
