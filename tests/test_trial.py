"""Tests for autoft.trial: one fine-tuning run on tiny in-memory data with tiny timm models."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoft import blocks, tasks, trial
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.tasks.base import Dataset
from autoft.tasks.image import ImageSpec, data, models, transforms
from autoft.trial import EpochMetrics, TrialOutcome, evaluate, run_trial
from conftest import CLASS_COLORS, image_setup

CPU = torch.device("cpu")
SIZE = 16


def _split(per_class: int, *, seed: int, noise: int = 20) -> data.ImageSet:
    """Solid class colours (class i = ``CLASS_COLORS[i]``) plus a little noise: easy to separate."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    colours = torch.tensor(CLASS_COLORS[:3])[labels][:, :, None, None]
    jitter = torch.randint(-noise, noise + 1, (len(labels), 3, SIZE, SIZE), generator=gen)
    return data.ImageSet((colours + jitter).clamp(0, 255).to(torch.uint8), labels)


@pytest.fixture(scope="module")
def dataset() -> data.Dataset:
    return Dataset(
        classes=("red", "green", "blue"),
        train=_split(8, seed=0),
        val=_split(4, seed=1),
        test=None,
        root=Path("."),
        image_size=SIZE,
        skipped=0,
    )


def _model(name: str = "test_resnet") -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=3, pretrained=False)


def _run(model: nn.Module, recipe: Recipe, dataset: data.Dataset, *, seed: int = 0, report=None) -> TrialOutcome:
    return run_trial(image_setup(model, dataset), recipe, seed=seed, report=report)


def _recipe(**fields: object) -> Recipe:
    base = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "augment": "none", "weight_decay": 0.0}
    return Recipe.from_params(base | fields)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: set[str] | None = None) -> bool:
    keys = set(a) if keys is None else keys
    return all(torch.equal(a[k], b[k]) for k in keys)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (``fc.`` for test_resnet, ``head.`` for test_vit, ...)."""
    prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in blocks.head_parameter_names(model))
    return {k for k in model.state_dict() if k.startswith(prefixes)}


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Record the trained model's state each time the trial evaluates it (once per epoch)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = trial.evaluate

    def recording(model: nn.Module, split: data.ImageSet, setup: Setup, **kwargs: object) -> tuple[float, float]:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, split, setup, **kwargs)

    monkeypatch.setattr(trial, "evaluate", recording)
    return seen


# --- learning -------------------------------------------------------------------------------------


def test_run_trial_learns_an_easy_task(dataset: data.Dataset) -> None:
    model = _model()
    _, untrained = evaluate(model, dataset.val, image_setup(model, dataset))
    outcome = _run(model, _recipe(epochs=3, optimizer="adam", lr=1e-2, head_lr_ratio=1.0), dataset)
    assert untrained < 0.5
    assert outcome.best_score >= 0.9
    assert outcome.history[-1].train_loss < outcome.history[0].train_loss
    assert [m.epoch for m in outcome.history] == [0, 1, 2]
    assert not outcome.stopped_early
    for m in outcome.history:
        assert 0.0 <= m.val_accuracy <= 1.0
        assert math.isfinite(m.train_loss) and math.isfinite(m.val_loss)
        assert m.seconds > 0


def test_run_trial_leaves_the_base_model_untouched(dataset: data.Dataset) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, _recipe(epochs=1), dataset)
    assert _same_state(before, model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_same_seed_same_history_and_weights(dataset: data.Dataset, augment: str) -> None:
    recipe = _recipe(augment=augment, epochs=2)

    def dropout_model() -> nn.Module:
        model = _model()
        model.drop_rate = 0.5  # timm ResNet's head dropout: draws from torch's global RNG
        return model

    first = _run(dropout_model(), recipe, dataset, seed=3)
    model = dropout_model()
    torch.rand(17)  # the caller's RNG state must not matter: the trial seeds everything it uses
    second = _run(model, recipe, dataset, seed=3)

    def without_time(outcome: TrialOutcome) -> list[EpochMetrics]:
        return [dataclasses.replace(m, seconds=0.0) for m in outcome.history]

    assert without_time(first) == without_time(second)
    assert (first.best_epoch, first.best_score) == (second.best_epoch, second.best_score)
    assert first.best_state.keys() == second.best_state.keys()
    assert _same_state(first.best_state, second.best_state)
    other = _run(dropout_model(), recipe, dataset, seed=4)
    assert without_time(other) != without_time(first)


@pytest.mark.parametrize("augment", ["none", "light"])
def test_epochs_of_n_examples_take_their_steps_from_successive_passes(
    dataset: data.Dataset, augment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[float] = []  # the learning rate of every set_lr call
    real = trial.optim.set_lr
    monkeypatch.setattr(trial.optim, "set_lr", lambda opt, lr: (steps.append(lr), real(opt, lr)))
    # 24 train images at batch 8: a pass is 3 steps. Epochs of 12 examples are 2 steps each: 4 epochs take 8
    # steps, the third pass cut after its second batch; the schedule runs over those 8 steps.
    rounds = _run(_model(), _recipe(epochs=4, epoch_examples=12, augment=augment), dataset, seed=5)
    steps = steps[1:]  # the first is the optimizer's creation; then one per step
    assert len(rounds.history) == 4 and len(steps) == 8
    last = 3e-3 * trial.optim.lr_factor(7, total_steps=8, warmup_steps=0, schedule="cosine")
    assert steps[0] == pytest.approx(3e-3) and steps[-1] == pytest.approx(last)  # cosine over 8 steps, not 12
    assert all(math.isfinite(m.train_loss) for m in rounds.history)
    # An epoch of exactly a pass's examples is the plain epoch: the same batches, augmentation draws and weights.
    plain = _run(_model(), _recipe(epochs=2, augment=augment), dataset, seed=5)
    whole = _run(_model(), _recipe(epochs=2, epoch_examples=24, augment=augment), dataset, seed=5)
    assert [dataclasses.replace(m, seconds=0.0) for m in plain.history] == [
        dataclasses.replace(m, seconds=0.0) for m in whole.history
    ]
    assert _same_state(plain.best_state, whole.best_state)


# --- report / stopping ----------------------------------------------------------------------------


def test_report_is_called_every_epoch_and_true_stops_early(dataset: data.Dataset) -> None:
    calls: list[tuple[int, EpochMetrics]] = []

    def report(epoch: int, metrics: EpochMetrics) -> bool:
        calls.append((epoch, metrics))
        return epoch == 1

    outcome = _run(_model(), _recipe(epochs=4), dataset, report=report)
    assert outcome.stopped_early
    assert len(outcome.history) == 2
    assert [e for e, _ in calls] == [0, 1]
    assert [m for _, m in calls] == outcome.history


def test_report_true_on_the_last_epoch_is_not_an_early_stop(dataset: data.Dataset) -> None:
    outcome = _run(_model(), _recipe(epochs=2), dataset, report=lambda epoch, metrics: epoch == 1)
    assert len(outcome.history) == 2
    assert not outcome.stopped_early


def test_a_passed_deadline_ends_the_trial_mid_epoch_once_it_has_a_best_epoch(dataset: data.Dataset) -> None:
    """The first epoch always ends (a trial needs one model); then the passed deadline stops it before a step."""
    setup = image_setup(_model(), dataset)
    outcome = run_trial(setup, _recipe(epochs=3, batch_size=4), seed=0, deadline=time.time() - 1)
    assert len(outcome.history) == 1 and outcome.best_epoch == 0 and outcome.best_state
    assert outcome.stopped_early and not outcome.interrupted
    assert outcome.notes["stopped_by_budget"] == "1 of 3 epochs (the deadline passed mid-epoch)"
    untouched = run_trial(setup, _recipe(epochs=3, batch_size=4), seed=0, deadline=time.time() + 3600)
    assert len(untouched.history) == 3 and "stopped_by_budget" not in untouched.notes


def test_an_epoch_the_deadline_cuts_after_some_steps_is_validated_and_ends_the_trial(
    dataset: data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 images at batch 4: 6 steps an epoch. The clock passes the deadline at the third step of epoch 2 (the
    first epoch never reads it): the 2 steps trained are validated as epoch 2, and the trial ends there."""
    readings = iter([0.0, 0.0])  # the deadline checks of epoch 2's first two steps; then past it
    monkeypatch.setattr(trial.time, "time", lambda: next(readings, 100.0))
    outcome = run_trial(image_setup(_model(), dataset), _recipe(epochs=3, batch_size=4), seed=0, deadline=50.0)
    assert len(outcome.history) == 2 and outcome.stopped_early
    assert outcome.notes["stopped_by_budget"] == "2 of 3 epochs, the last cut at the deadline after 8 examples"


# --- best epoch -----------------------------------------------------------------------------------


def test_best_state_is_the_best_epochs_weights(
    dataset: data.Dataset, snapshots: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([0.5, 0.9, 0.9, 0.3])  # best at epoch 1; a tie later must not replace it
    recording = trial.evaluate

    def scored(model: nn.Module, split: data.ImageSet, setup: Setup, **kwargs: object) -> tuple[float, float]:
        loss, _ = recording(model, split, setup, **kwargs)
        return loss, next(scripted)

    monkeypatch.setattr(trial, "evaluate", scored)
    outcome = _run(_model(), _recipe(epochs=4, optimizer="sgd", lr=0.05), dataset)
    assert [m.val_accuracy for m in outcome.history] == [0.5, 0.9, 0.9, 0.3]
    assert (outcome.best_epoch, outcome.best_score) == (1, 0.9)
    assert len(snapshots) == 4
    assert _same_state(outcome.best_state, snapshots[1])
    assert not _same_state(outcome.best_state, snapshots[3])  # a copy, not the final weights
    assert all(v.device.type == "cpu" for v in outcome.best_state.values())


def test_best_state_reproduces_the_best_epochs_score(dataset: data.Dataset) -> None:
    model = _model()
    outcome = _run(model, _recipe(epochs=3, lr=1e-2), dataset)
    scores = [m.val_accuracy for m in outcome.history]
    assert outcome.best_score == max(scores)
    assert outcome.best_epoch == scores.index(max(scores))
    restored = _model()
    restored.load_state_dict(outcome.best_state)
    loss, accuracy = evaluate(restored, dataset.val, image_setup(restored, dataset))
    assert accuracy == outcome.best_score
    assert loss == pytest.approx(outcome.history[outcome.best_epoch].val_loss, rel=1e-5)


# --- freezing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_linear_probe_changes_only_the_head(dataset: data.Dataset, name: str) -> None:
    model = _model(name)
    base = model.state_dict()
    outcome = _run(model, _recipe(freeze="linear_probe", epochs=1, lr=1e-2), dataset)
    head = _head_keys(model)
    assert head
    backbone = set(base) - head
    assert _same_state(outcome.best_state, base, backbone)  # weights and BatchNorm statistics
    assert not _same_state(outcome.best_state, base, head)


def test_lp_ft_trains_the_backbone_only_after_lp_epochs(dataset: data.Dataset, snapshots: list) -> None:
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    head = _head_keys(model)
    backbone_weights = {n for n, _ in model.named_parameters()} - head
    _run(model, _recipe(freeze="lp_ft", lp_epochs=2, epochs=3, lr=1e-2), dataset)
    assert len(snapshots) == 3
    for epoch in (0, 1):
        assert _same_state(snapshots[epoch], base, set(base) - head), epoch
        assert not _same_state(snapshots[epoch], base, head)
    changed = {k for k in backbone_weights if not torch.equal(snapshots[2][k], snapshots[1][k])}
    assert "conv1.0.weight" in changed
    assert len(changed) > len(backbone_weights) // 2


def test_partial_freeze_trains_only_the_last_block_groups(dataset: data.Dataset) -> None:
    model = _model()
    base = model.state_dict()
    outcome = _run(model, _recipe(freeze="partial", train_blocks=1, epochs=1, lr=1e-2), dataset)
    last = set(blocks.block_groups(model)[-1])
    changed = {k for k in base if not torch.equal(outcome.best_state[k], base[k])}
    assert changed
    assert all(k.startswith(("layer4.", "fc.")) for k in changed), sorted(changed)
    assert last & changed


# --- failures -------------------------------------------------------------------------------------


def test_non_finite_loss_ends_the_trial_as_diverged_with_the_reason(dataset: data.Dataset) -> None:
    recipe = _recipe(optimizer="sgd", lr=1e30, epochs=3, head_lr_ratio=1.0)
    outcome = _run(_model(), recipe, dataset)
    assert re.search(r"training loss became (nan|inf) in epoch \d .*1\.00e\+30", outcome.diverged)
    assert outcome.stopped_early and len(outcome.history) < 3


# --- evaluate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [256, 5])
def test_evaluate_matches_a_manual_computation(dataset: data.Dataset, batch_size: int) -> None:
    model = _model()
    model.train()
    cfg = models.data_config(model)
    loss, accuracy = evaluate(model, dataset.val, image_setup(model, dataset), batch_size=batch_size)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(transforms.normalize(dataset.val.images, mean=cfg["mean"], std=cfg["std"]))
    expected = (logits.argmax(1) == dataset.val.labels).sum().item() / len(dataset.val)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(expected)
    assert loss == pytest.approx(F.cross_entropy(logits, dataset.val.labels).item(), rel=1e-5)


def test_evaluate_of_a_perfect_and_a_wrong_classifier() -> None:
    split = _split(2, seed=0)

    class ByColour(nn.Module):
        def __init__(self, shift: int) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3)).roll(self.shift, dims=1) * 10  # strongest channel = class colour

    for shift, expected in ((0, 1.0), (1, 0.0)):
        spec = ImageSpec(SIZE, (0.5,) * 3, (0.5,) * 3)
        setup = Setup(tasks.get("image"), ByColour(shift), None, spec, CPU)
        _, accuracy = evaluate(setup.base_model, split, setup)
        assert accuracy == expected


def test_resolve_device() -> None:
    assert trial.resolve_device("cpu") == CPU
    assert trial.resolve_device("auto").type in ("cpu", "cuda", "mps")
