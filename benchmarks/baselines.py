"""What autoft is compared with, written the way a user would: a hand-written Optuna script and the untuned recipe.

- ``handwritten_search``: ``optuna.create_study`` with a seeded TPE sampler (Optuna's defaults otherwise), an
  objective that suggests the knobs of autoft's default space by hand (``suggest_knobs``), copies the
  pretrained model and trains it with a plain PyTorch loop (``train_plain``: no pruning, no feature cache, no
  warm start), evaluates val after every epoch and returns the best epoch's val accuracy (autoft's trial value
  too); ``study.optimize(n_trials=..., timeout=...)``. So that every method gets the same wall-clock budget,
  a trial running at the timeout stops after the epoch that crosses it (as autoft's trials and the untuned
  recipe do); a script that let it finish would overrun a 2-minute budget by up to a whole trial.
- random search: the same script with ``optuna.samplers.RandomSampler`` -- random search as people run it,
  over the same space and loop, so its gap to the TPE script is the sampler's alone.
- ``untuned_default``: one full fine-tune with ``autoft.BASELINE`` (Adam lr 1e-3, no weight decay, light
  augmentation), ``max_epochs`` epochs, the best val epoch kept; it stops after the epoch that crosses the budget.
- ``autoft_search``: ``autoft.search(...)`` with its defaults (the public API, so it follows the controller).

The plain loop takes the knob semantics from autoft's small helpers (``Recipe.from_params`` for defaults,
``models.apply_freeze`` for block groups, ``optim.create_optimizer`` for head rate / layer decay / no decay
on norms, ``optim.lr_factor`` for warmup + cosine, ``transforms.augment``), so both sides search literally the same
space; the loop itself is the plain one. It gets the decoded images in memory for free (``prepare``), the
kindest set-up for the script: what is compared is the search, not image decoding.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

import autoft
from autoft import blocks, optim
from autoft.config import SearchConfig
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.tasks.image import transforms
from autoft.trial import evaluate

__all__ = [
    "Clock",
    "MethodResult",
    "autoft_search",
    "bench_setup",
    "handwritten_search",
    "suggest_knobs",
    "suggest_simple",
    "test_accuracy",
    "train_plain",
    "untuned_default",
]


@dataclass
class MethodResult:
    """One method's run: its best val accuracy, that model's test accuracy, and its val curve over wall time.

    ``curve``: (seconds since the method started, trial val accuracy) for every trial that finished, in order;
    ``cpu_curve``: the same with this process's CPU seconds as the clock (less swayed by other load on a shared
    machine than wall time: it counts the work done, not the waiting).
    """

    method: str
    val_accuracy: float
    test_accuracy: float | None
    trials: int
    seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    cpu_curve: list[tuple[float, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0

    def best_by(self, seconds: float, *, cpu: bool = False) -> float | None:
        """The best val accuracy among trials finished within ``seconds``; None if none had."""
        return max((v for t, v in (self.cpu_curve if cpu else self.curve) if t <= seconds), default=None)

    def time_to_reach(self, target: float, *, cpu: bool = False) -> float | None:
        """Seconds until the first trial reached val accuracy ``target``; None if none did."""
        return next((t for t, v in (self.cpu_curve if cpu else self.curve) if v >= target), None)


class Clock:
    """Wall and CPU seconds since it was made: the two clocks of a method's curve."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.monotonic() - self.wall, time.process_time() - self.cpu


def bench_setup(
    data_dir: Path, *, model: str, weights: Path | None, image_size: int, seed: int = 0, pretrained: bool = True
) -> Setup:
    """Model (weights loaded once) and the decoded data, shared by the hand-written methods."""
    config = SearchConfig(
        model=model, data=data_dir, weights=weights, pretrained=pretrained, image_size=image_size, seed=seed
    )
    return prepare(config)


def suggest_knobs(trial: optuna.Trial, *, max_epochs: int) -> dict[str, Any]:
    """The knobs of search_spaces/default.yaml, suggested by hand as a user's objective would.

    Epochs are capped at ``max_epochs`` as autoft caps them (``--max-epochs``).
    """
    knobs: dict[str, Any] = {
        "freeze": trial.suggest_categorical("freeze", ["linear_probe", "partial", "full", "lp_ft"])
    }
    if knobs["freeze"] == "partial":
        knobs["train_blocks"] = trial.suggest_int("train_blocks", 1, 4)
    if knobs["freeze"] == "lp_ft":
        knobs["lp_epochs"] = trial.suggest_int("lp_epochs", 1, 3)
    knobs["freeze_bn_stats"] = trial.suggest_categorical("freeze_bn_stats", [False, True])
    knobs["optimizer"] = trial.suggest_categorical("optimizer", ["adamw", "adam", "sgd"])
    knobs["lr"] = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
    if knobs["optimizer"] == "sgd":
        knobs["momentum"] = trial.suggest_float("momentum", 0.8, 0.99)
    if knobs["freeze"] != "linear_probe":
        knobs["head_lr_ratio"] = trial.suggest_float("head_lr_ratio", 1.0, 30.0, log=True)
        knobs["layer_decay"] = trial.suggest_float("layer_decay", 0.5, 1.0)
    knobs["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 0.1, log=True)
    knobs["epochs"] = trial.suggest_int("epochs", min(2, max_epochs), min(12, max_epochs))
    knobs["warmup_epochs"] = trial.suggest_int("warmup_epochs", 0, 2)
    knobs["schedule"] = trial.suggest_categorical("schedule", ["cosine", "constant"])
    knobs["batch_size"] = trial.suggest_categorical("batch_size", [16, 32, 64, 128])
    knobs["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.2)
    knobs["augment"] = trial.suggest_categorical("augment", ["none", "light", "strong"])
    return knobs


def suggest_simple(trial: optuna.Trial, *, max_epochs: int) -> dict[str, Any]:
    """The short script a person writes in an afternoon (issue 14's 60-line script, which beat autoft at 77 s):
    freeze the body / all but the last two block groups / nothing, lr, weight decay, AdamW or SGD, 1-5 epochs,
    batch 32, no augmentation; everything else at the recipe's defaults."""
    freeze = trial.suggest_categorical("freeze", ["head", "last2", "none"])
    knobs: dict[str, Any] = {"freeze": {"head": "linear_probe", "last2": "partial", "none": "full"}[freeze]}
    if freeze == "last2":
        knobs["train_blocks"] = 2
    knobs["lr"] = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    knobs["weight_decay"] = trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
    knobs["optimizer"] = trial.suggest_categorical("optimizer", ["adamw", "sgd"])
    knobs["epochs"] = trial.suggest_int("epochs", 1, min(5, max_epochs))
    return knobs | {"batch_size": 32, "augment": "none", "head_lr_ratio": 1.0}


SCRIPTS: dict[str, Callable[..., dict[str, Any]]] = {"default_space": suggest_knobs, "simple": suggest_simple}


@dataclass
class PlainOutcome:
    best_val: float
    best_state: dict[str, torch.Tensor]
    epochs_run: int


def train_plain(setup: Setup, knobs: dict[str, Any], *, seed: int, deadline: float | None = None) -> PlainOutcome:
    """Fine-tune a copy of the pretrained model with a plain loop; val after each epoch, best epoch kept.

    ``deadline`` (``time.monotonic()`` value): stop after the epoch that crosses it (the untuned recipe's budget).
    """
    recipe = Recipe.from_params(knobs)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device, train = setup.device, setup.dataset.train
    model = copy.deepcopy(setup.base_model).to(device)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps, warmup_steps = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    best = PlainOutcome(best_val=-1.0, best_state={}, epochs_run=0)
    phase, optimizer, step = object(), None, 0
    for epoch in range(recipe.epochs):
        if recipe.train_blocks_at(epoch) != phase:  # LP-FT unfreezes after its head-only epochs
            phase = recipe.train_blocks_at(epoch)
            blocks.apply_freeze(model, train_blocks=phase)
            optimizer = optim.create_optimizer(model, recipe)
        blocks.set_train_mode(model, freeze_bn_stats=recipe.freeze_bn_stats)
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            factor = optim.lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=recipe.schedule)
            optim.set_lr(optimizer, recipe.lr * factor)
            images = transforms.augment(train.images[rows], recipe.augment, generator=generator)
            inputs = transforms.normalize(images.to(device), mean=setup.spec.mean, std=setup.spec.std)
            loss = F.cross_entropy(model(inputs), train.labels[rows].to(device), label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        _, val_accuracy = evaluate(model, setup.dataset.val, setup)
        best.epochs_run = epoch + 1
        if val_accuracy > best.best_val:
            best.best_val = val_accuracy
            best.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if deadline is not None and time.monotonic() > deadline:
            break
    return best


def test_accuracy(setup: Setup, state: dict[str, torch.Tensor]) -> float | None:
    """Test accuracy of the pretrained model with ``state`` loaded (None when the data has no test split)."""
    if setup.dataset.test is None or not state:
        return None
    model = copy.deepcopy(setup.base_model)
    model.load_state_dict(state)
    _, accuracy = evaluate(model, setup.dataset.test, setup)
    return accuracy


def handwritten_search(
    setup: Setup,
    *,
    sampler: str = "tpe",
    script: str = "default_space",
    trials: int | None,
    timeout: float | None,
    seed: int,
    max_epochs: int,
    on_trial: Callable[[int, float, float], None] | None = None,
) -> MethodResult:
    """The hand-written Optuna script: ``sampler`` "tpe" (seeded TPE) or "random" (seeded random search);
    ``script`` "default_space" (every knob of autoft's default space) or "simple" (:func:`suggest_simple`).

    ``on_trial(number, seconds, value)`` is told of each finished trial (progress display).
    """
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    study = optuna.create_study(direction="maximize", sampler=samplers[sampler](seed=seed))
    clock = Clock()
    curve: list[tuple[float, float]] = []
    cpu_curve: list[tuple[float, float]] = []
    best: dict[str, Any] = {"val": -1.0, "state": {}}
    deadline = clock.wall + timeout if timeout else None

    def objective(trial: optuna.Trial) -> float:
        knobs = SCRIPTS[script](trial, max_epochs=max_epochs)
        outcome = train_plain(setup, knobs, seed=seed + trial.number, deadline=deadline)
        wall, cpu = clock.read()
        curve.append((wall, outcome.best_val))
        cpu_curve.append((cpu, outcome.best_val))
        if outcome.best_val > best["val"]:
            best.update(val=outcome.best_val, state=outcome.best_state)
        if on_trial is not None:
            on_trial(trial.number, curve[-1][0], outcome.best_val)
        return outcome.best_val

    study.optimize(objective, n_trials=trials, timeout=timeout)
    seconds, cpu_seconds = clock.read()
    return MethodResult(
        method=f"handwritten_{sampler}" if script == "default_space" else f"handwritten_{script}",
        val_accuracy=best["val"],
        test_accuracy=test_accuracy(setup, best["state"]),
        trials=len(curve),
        seconds=seconds,
        curve=curve,
        cpu_curve=cpu_curve,
        cpu_seconds=cpu_seconds,
    )


def untuned_default(setup: Setup, *, seed: int, max_epochs: int, timeout: float | None = None) -> MethodResult:
    """One full fine-tune with ``autoft.BASELINE`` (Adam lr 1e-3) for ``max_epochs`` epochs, within ``timeout``."""
    clock = Clock()
    deadline = clock.wall + timeout if timeout else None
    recipe = replace(autoft.BASELINE, epochs=max_epochs)
    knobs = {f: getattr(recipe, f) for f in Recipe.__dataclass_fields__ if f != "extra"}
    outcome = train_plain(setup, knobs, seed=seed, deadline=deadline)
    seconds, cpu_seconds = clock.read()
    return MethodResult(
        method="untuned_default",
        val_accuracy=outcome.best_val,
        test_accuracy=test_accuracy(setup, outcome.best_state),
        trials=1,
        seconds=seconds,
        curve=[(seconds, outcome.best_val)],
        cpu_curve=[(cpu_seconds, outcome.best_val)],
        cpu_seconds=cpu_seconds,
    )


def autoft_search(
    data_dir: Path,
    *,
    model: str,
    run_dir: Path,
    trials: int | None,
    timeout: float | None,
    seed: int,
    max_epochs: int,
    **options: Any,
) -> MethodResult:
    """``autoft.search`` with its defaults; the curve holds its COMPLETE trials, timed by its progress events.

    ``run_dir`` must be new (an existing study there would be continued, not started afresh).
    """
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists; autoft would continue its study. Remove it or pick another.")
    clock = Clock()
    curve: list[tuple[float, float]] = []
    cpu_curve: list[tuple[float, float]] = []

    def on_progress(event: autoft.Progress) -> None:
        if event.kind == "trial_end" and event.state == TrialState.COMPLETE.name:
            wall, cpu = clock.read()
            curve.append((wall, event.score))
            cpu_curve.append((cpu, event.score))

    result = autoft.search(
        model, data_dir, trials=trials, timeout=timeout, progress=on_progress, seed=seed, max_epochs=max_epochs,
        run_dir=run_dir, **options,
    )  # fmt: skip
    seconds, cpu_seconds = clock.read()
    return MethodResult(
        method="autoft",
        val_accuracy=result.best_score,
        test_accuracy=result.test_score,
        trials=len(result.study.trials),
        seconds=seconds,
        curve=curve,
        cpu_curve=cpu_curve,
        cpu_seconds=cpu_seconds,
    )
