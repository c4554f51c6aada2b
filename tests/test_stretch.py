"""The search's last trial fits its optimizer steps to the time left (autoft.stretch), and only that trial."""

from __future__ import annotations

import time

import pytest

from autoft import stretch, trial
from autoft.budget import Budget
from autoft.config import SearchConfig
from autoft.preparation import prepare
from autoft.runner import TrialRunner
from conftest import make_image_folder


class _Clock:
    """perf_counter and time readings the test sets (StepFit's only inputs besides the calls it gets)."""

    def __init__(self) -> None:
        self.perf, self.wall = 0.0, 0.0

    def perf_counter(self) -> float:
        return self.perf

    def time(self) -> float:
        return self.wall


def test_the_fit_gives_the_steps_that_end_training_by_the_deadline_with_its_validations(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(stretch, "time", clock)
    fit = stretch.StepFit(epochs=2, planned=10, warmup_epochs=1, until=100.0, validation=5.0)
    fit.start_epoch(0)
    for step in range(1, stretch.FIRST_FIT_STEPS + 2):  # the first step is not timed; then 1 s per step
        clock.perf = float(step)
        fit.after_step(step, epoch=0)
    # 9 steps done at wall 0, 1 s each; 100 s left minus 2 validations of 5 s: 90 more steps.
    assert fit.fitted and fit.total == 9 + 90
    assert fit.epoch_end(0) == 50 and fit.warmup_steps == 50  # the epochs share the steps; warmup is one epoch
    # Epoch 1 ends at step 50, wall 60; its validation took 10 s: 100 - 60 - 10 = 30 s at 1 s a step.
    clock.perf, clock.wall = 50.0, 60.0
    fit.after_epoch(50, epoch=0, validation_seconds=10.0)
    assert fit.total == 80 and fit.epoch_end(1) == 80
    # A machine too slow for any step more still gives every epoch left one step.
    clock.wall = 99.0
    fit.after_epoch(50, epoch=0, validation_seconds=10.0)
    assert fit.total == 51


def test_lp_ft_keeps_its_probe_epoch_and_fits_the_fine_tuning_on_its_own_pace(monkeypatch) -> None:
    """The probe epoch (head only: inactive) keeps its planned steps; the fine-tuning epochs share what fits at
    their own pace, not the probe's much faster one."""
    clock = _Clock()
    monkeypatch.setattr(stretch, "time", clock)
    fit = stretch.StepFit(epochs=3, planned=30, warmup_epochs=0, until=1000.0, validation=0.0)
    fit.retime(active=False)
    fit.start_epoch(0)
    for step in range(1, 11):  # the probe epoch: 10 steps of 10 ms
        clock.perf = step * 0.01
        fit.after_step(step, epoch=0)
    assert not fit.fitted and fit.epoch_end(0) == 10
    fit.after_epoch(10, epoch=0, validation_seconds=0.0)
    assert not fit.fitted and fit.total == 30
    fit.retime(active=True)
    fit.start_epoch(10)
    for step in range(11, 11 + stretch.FIRST_FIT_STEPS + 1):  # step 11 is not timed; 12-19 at 1 s each
        clock.perf += 1.0
        fit.after_step(step, epoch=1)
    assert fit.fitted and fit.total == 19 + 1000
    assert fit.epoch_end(1) == 10 + 505 and fit.epoch_end(2) == 1019  # the two fine-tuning epochs share it


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchConfig, dict]:
    tmp_path = tmp_path_factory.mktemp("stretch")
    data = make_image_folder(tmp_path / "data", per_class=8)
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu", run_dir=tmp_path / "run"
    ).resolved()
    return cfg, {cfg.model: prepare(cfg)}


FINE_TUNE = {"freeze": "full", "epochs": 2, "batch_size": 4, "lr": 1e-3, "augment": "none"}  # 6 steps an epoch


def test_the_last_trial_trains_until_the_search_ends_and_its_schedule_follows(setups, monkeypatch) -> None:
    """8 s left and an epoch planned at 100 s: no other trial could start after this one, so its 12 planned steps
    become as many as fit; the cosine schedule runs over those, and the budget still holds."""
    cfg, prepared = setups
    rates: list[float] = []
    real = trial.optim.set_lr
    monkeypatch.setattr(trial.optim, "set_lr", lambda opt, lr: (rates.append(lr), real(opt, lr)))
    budget = Budget(search_end=time.time() + 8, epoch_seconds=100.0, validation_seconds=0.1)
    outcome = TrialRunner(cfg, prepared, budget=budget)(0, FINE_TUNE, lambda epoch, metrics: False)
    assert outcome.notes["planned_steps"] == 12 and outcome.notes["fitted_steps"] > 12
    assert len(outcome.history) == 2 and not outcome.stopped_early
    # One set_lr per step after the optimizer's own; the last steps follow the cosine over the fitted steps (the
    # deadline may cut the trial a few steps before their end on a busy machine).
    fitted, last = outcome.notes["fitted_steps"], len(rates) - 2
    cosine = trial.optim.lr_factor(last, total_steps=fitted, warmup_steps=0, schedule="cosine")
    assert rates[-1] == pytest.approx(FINE_TUNE["lr"] * cosine) and last > 12
    assert time.time() <= budget.search_end + 1.0


@pytest.mark.parametrize(
    ("params", "left"),
    [(FINE_TUNE, 1000.0), (FINE_TUNE | {"freeze": "linear_probe"}, 4.0)],
    ids=["another-trial-could-follow", "head-only"],
)
def test_other_trials_keep_the_steps_their_knobs_say(setups, params: dict, left: float) -> None:
    """A trial after which another could start, and a head-only trial (a probe converges; the fine-tune that may
    follow it needs the time), train exactly their planned steps."""
    cfg, prepared = setups
    budget = Budget(search_end=time.time() + left, epoch_seconds=1.0)
    outcome = TrialRunner(cfg, prepared, budget=budget)(0, params, lambda epoch, metrics: False)
    assert "fitted_steps" not in outcome.notes and len(outcome.history) == 2


def test_a_fitted_trial_says_so_in_its_note() -> None:
    from autoft import results

    note = results._note({"fitted_steps": 480, "planned_steps": 342})
    assert note == "the search's last trial: 480 steps fitted to the time left (its knobs: 342)"


def test_an_lp_ft_last_trial_probes_for_its_planned_steps_then_fits_its_fine_tuning(setups, monkeypatch) -> None:
    cfg, prepared = setups
    rates: list[float] = []
    real = trial.optim.set_lr
    monkeypatch.setattr(trial.optim, "set_lr", lambda opt, lr: (rates.append(lr), real(opt, lr)))
    created: list[int] = []  # how many set_lr calls came before each optimizer (each sets its rate once, then steps)
    real_create = trial.optim.create_optimizer
    monkeypatch.setattr(trial.optim, "create_optimizer", lambda *a: (created.append(len(rates)), real_create(*a))[1])
    budget = Budget(search_end=time.time() + 8, epoch_seconds=100.0, validation_seconds=0.1)
    params = FINE_TUNE | {"freeze": "lp_ft", "lp_epochs": 1, "epochs": 3}
    outcome = TrialRunner(cfg, prepared, budget=budget)(0, params, lambda epoch, metrics: False)
    assert created[1] - created[0] - 1 == 6  # the probe epoch: its planned 6 steps (24 images at batch 4)
    assert outcome.notes["planned_steps"] == 18 and outcome.notes["fitted_steps"] > 18
    assert len(outcome.history) == 3
