"""The plan before the first trial: data profile, linear probe, priors, the --timeout budget (issue 7)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoft import features, plan, results, step_cost
from autoft import probe as probe_module
from autoft.backends import local
from autoft.budget import (
    EPOCH_SAFETY,
    MIN_USEFUL_EPOCHS,
    MIN_USEFUL_STEPS,
    WRAP_UP_FIXED_SECONDS,
    Budget,
    plan_budget,
)
from autoft.cli import main
from autoft.config import SearchConfig
from autoft.controller import _LocalTrial, run_search
from autoft.errors import AutoftError
from autoft.keeper import RunFolder
from autoft.preparation import prepare
from autoft.priors import Prior, apply_priors, choose_priors
from autoft.probe import DataProfile, Probe, _linear_probe, probe, profile_data, sample_rows
from autoft.recipe import Recipe
from autoft.runner import TrialRunner
from autoft.space import load_space
from autoft.step_cost import ModeCost, train_seconds_per_image
from autoft.study import open_study
from conftest import make_image_folder

PROFILE = DataProfile(train=900, val=300, test=300, classes=3, smallest_class=100, largest_class=500, image_size=64)
PROBE = Probe(
    linear_probe_accuracy=0.6,
    chance=0.4,
    epoch_seconds_full=10.0,
    epoch_seconds_head=0.1,
    eval_seconds_per_image=0.001,
    seconds=3.0,
)


def _probe(accuracy: float) -> Probe:
    return dataclasses.replace(PROBE, linear_probe_accuracy=accuracy)


def _epoch(seconds: float) -> Probe:
    return dataclasses.replace(PROBE, epoch_seconds_full=seconds)


def _param(space, name):
    return next((p for p in space.params if p.name == name), None)


# ------------------------------------------------------------------------------------------ budget (pure)


def test_budget_reserves_spent_and_wrap_up_and_fits_three_full_trials() -> None:
    budget = plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median")
    assert budget.wrap_up == pytest.approx(WRAP_UP_FIXED_SECONDS + 0.001 * 300 + 0.03 * 600)  # test, once
    assert budget.search == pytest.approx(600 - 30 - budget.wrap_up)
    epoch = 10 * EPOCH_SAFETY
    assert budget.epoch_seconds == pytest.approx(epoch)  # 10 s measured x the safety margin
    assert int(budget.search // (3 * epoch)) > 10 and budget.max_epochs == 10  # capped by --max-epochs
    assert budget.pruner == "hyperband"  # trials of 9+ epochs: rungs at 1, 3, 9 cut bad ones early
    applied = Budget.from_plan(budget, started=time.time() - 30)  # the plan was made 30 s into the command
    assert applied.launch_window() == pytest.approx(budget.search - epoch, abs=1)  # one epoch must still fit
    validation = EPOCH_SAFETY * 0.001 * PROFILE.val  # one val evaluation with the margin
    assert budget.validation_seconds == pytest.approx(validation) == applied.validation_seconds
    assert applied.trial_deadline == pytest.approx(applied.search_end - validation)


def test_the_wrap_up_reserve_follows_the_machines_load(monkeypatch) -> None:
    """2 s on an idle machine, scaled by the load per usable core (a busy machine's report is slower too); the
    flat 5 s where the load cannot be read."""
    from autoft import budget as budget_module

    monkeypatch.setattr(budget_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(budget_module.os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    assert budget_module.wrap_up_fixed_seconds() == 2.0  # idle: never below the idle figure
    monkeypatch.setattr(budget_module.os, "getloadavg", lambda: (6.5, 6.0, 5.0))
    assert budget_module.wrap_up_fixed_seconds() == pytest.approx(6.5)  # 3.25 runnable per core

    def unreadable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(budget_module.os, "getloadavg", unreadable)
    assert budget_module.wrap_up_fixed_seconds() == WRAP_UP_FIXED_SECONDS
    quiet = plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median", wrap_up_fixed=2.0)
    assert quiet.wrap_up == pytest.approx(2.0 + 0.001 * 300 + 0.03 * 600)


def test_a_part_of_an_epoch_fits_where_a_whole_one_does_not() -> None:
    budget = Budget(search_end=time.time() + 10, epoch_seconds=20.0, validation_seconds=2.0)
    assert not budget.next_epoch_fits(last_epoch_seconds=5)
    assert budget.last_part_fits(last_epoch_seconds=5)  # a quarter of 20 s and 2 s of validation end in time
    assert not budget.last_part_fits(last_epoch_seconds=40)  # the trial's own epochs are slower: 10 + 2 > 10


def test_a_tight_budget_shortens_trials_and_keeps_the_users_pruner() -> None:
    budget = plan_budget(200, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median")
    assert budget.max_epochs == int((200 - 30 - budget.wrap_up) // (3 * budget.epoch_seconds)) == 4
    assert budget.pruner == "median"
    assert plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="wilcoxon").pruner == "wilcoxon"


def test_the_final_models_cost_is_reserved_before_the_search() -> None:
    plain = plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median")
    soup = plan_budget(600, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median", soup_models=4)
    assert soup.wrap_up == pytest.approx(plain.wrap_up + 5 * 0.001 * PROFILE.val)  # 4 kept models + the best, on val
    refit = plan_budget(500, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median", refit=True)
    plain = plan_budget(500, PROBE, PROFILE, spent=30, max_epochs=10, pruner="median")
    refit_epoch = 10 * EPOCH_SAFETY * (PROFILE.train + PROFILE.val) / PROFILE.train
    assert refit.wrap_up == pytest.approx(plain.wrap_up + refit.max_epochs * refit_epoch)
    assert refit.max_epochs < plain.max_epochs  # three full trials and the refit of the longest now share the time
    assert refit.search >= 3 * refit.max_epochs * refit.epoch_seconds


def test_a_small_budget_gives_one_trial_all_its_epochs_not_three_short_trials() -> None:
    small = plan_budget(120, _epoch(10.0), PROFILE, spent=16, max_epochs=6, pruner="median")
    fits = int(small.search // small.epoch_seconds)
    assert fits < 3 * MIN_USEFUL_EPOCHS and small.max_epochs == min(6, fits) > fits // 3
    tiny = plan_budget(60, _epoch(20.0), PROFILE, spent=10, max_epochs=6, pruner="median")
    assert tiny.max_epochs == int(tiny.search // tiny.epoch_seconds) >= 1  # as many epochs as fit, at least one
    roomy = plan_budget(600, _epoch(10.0), PROFILE, spent=16, max_epochs=20, pruner="median")
    assert roomy.max_epochs == int(roomy.search // roomy.epoch_seconds) // 3 >= MIN_USEFUL_EPOCHS  # 3 trials


def test_trials_share_the_budget_only_when_each_gets_enough_optimizer_steps() -> None:
    # 48 epochs fit: three trials of 16. At 10 steps per epoch that is 160 updates each, enough; at 5 steps per
    # epoch (a small split at the largest batch) 80 each, too few: one trial takes all 48 epochs instead.
    plan = lambda steps: plan_budget(  # noqa: E731
        600, _epoch(10.0), PROFILE, spent=16, max_epochs=60, pruner="median", steps_per_epoch=steps
    )
    fits = int(plan(None).search // plan(None).epoch_seconds)
    assert plan(None).max_epochs == plan(10).max_epochs == fits // 3 and 10 * fits // 3 >= MIN_USEFUL_STEPS
    assert 5 * (fits // 3) < MIN_USEFUL_STEPS and plan(5).max_epochs == fits


def test_a_budget_short_of_a_few_passes_trains_in_rounds_of_fewer_examples() -> None:
    # 30 s, 20 spent, wrap-up 6.2 s (5 + 300 test evaluations x 1 ms + 3%): 3.8 s of search against an 11.5 s
    # pass (10 s x EPOCH_SAFETY). Three validated rounds of N examples share it: (3.8 / 3 - 0.345 s val) / 12.4 ms.
    budget = plan_budget(30, PROBE, PROFILE, spent=20, max_epochs=10, pruner="median", smallest_round=64)
    validation, per_example = EPOCH_SAFETY * 0.001 * PROFILE.val, (10.0 * EPOCH_SAFETY - 0.345) / PROFILE.train
    assert budget.max_epochs == 3 and budget.expected_trials == 1 and budget.head_passes  # 3 x 0.115 s fit
    slow_head = dataclasses.replace(PROBE, epoch_seconds_head=2.0)
    assert not plan_budget(30, slow_head, PROFILE, spent=20, max_epochs=10, pruner="median").head_passes
    assert budget.epoch_examples == int((budget.search / 3 - validation) // per_example) == 74
    assert budget.epoch_seconds == pytest.approx(validation + 74 * per_example)
    assert 3 * budget.epoch_seconds <= budget.search  # the rounds fit the search time
    # A round may not hold less than the largest batch: then fewer, longer rounds.
    fewer = plan_budget(30, PROBE, PROFILE, spent=20, max_epochs=10, pruner="median", smallest_round=100)
    assert fewer.max_epochs == 2 and fewer.epoch_examples >= 100
    # Two passes fit (not MIN_USEFUL_EPOCHS): still rounds, each shorter than a pass; three passes: whole passes.
    assert 0 < plan_budget(40, PROBE, PROFILE, spent=5, max_epochs=10, pruner="median").epoch_examples < 900
    assert plan_budget(60, PROBE, PROFILE, spent=5, max_epochs=10, pruner="median").epoch_examples == 0


def test_a_budget_that_cannot_fit_one_round_is_one_clear_error() -> None:
    with pytest.raises(AutoftError, match=r"--timeout 30s is too short: .* give at least --timeout \d+s\."):
        plan_budget(30, PROBE, PROFILE, spent=24, max_epochs=10, pruner="median", smallest_round=64)


def _cost(mode: str, epoch: float, trainable: int = 10) -> ModeCost:
    return ModeCost(mode, mode, epoch / PROFILE.train, epoch, trainable, parameters=1000, peak_bytes=None)


# Full fine-tuning's epoch 10 s (PROBE); LoRA's 4 s, BitFit's 3 s, norm's 2.5 s as the probe would record them.
PEFT_PROBE = dataclasses.replace(
    PROBE, modes=(_cost("full", 10.0, 1000), _cost("lora", 4.0), _cost("bitfit", 3.0), _cost("norm", 2.5))
)


def test_a_parameter_efficient_space_is_planned_at_its_own_costliest_mode() -> None:
    plan_for = lambda *modes: plan_budget(600, PEFT_PROBE, PROFILE, spent=30, max_epochs=60, pruner="median",  # noqa: E731
                                          modes=modes)  # fmt: skip
    peft = plan_for("lora", "lora_bias", "bitfit", "norm", "linear_probe")
    assert peft.epoch_mode == "lora" and peft.epoch_seconds == pytest.approx(4.0 * EPOCH_SAFETY)
    full = plan_for("linear_probe", "partial", "full", "lp_ft", "lora", "bitfit", "norm")
    assert full.epoch_mode == "full" and full.epoch_seconds == pytest.approx(10.0 * EPOCH_SAFETY)
    assert peft.max_epochs > full.max_epochs  # the same time holds more of the cheaper epochs
    assert plan_for().epoch_seconds == plan_for("full").epoch_seconds == full.epoch_seconds  # unknown modes: full
    assert plan_for("bitfit", "norm").epoch_mode == "bitfit"
    assert plan_for("my_piece").epoch_mode == "full"  # a registered freeze piece's cost is unknown: the safe bound
    assert plan_for("partial").epoch_mode == "full"  # not measured (full was offered): counted as full
    assert plan_for("linear_probe").epoch_mode == "head"  # a linear probe keeps its head-only epoch
    assert plan_for("linear_probe").epoch_seconds == pytest.approx(0.1 * EPOCH_SAFETY)


def test_the_space_says_which_freeze_modes_the_probe_times() -> None:
    kinds = lambda name: [(r.freeze, r.lora_rank, r.lora_targets) for r in plan._cost_recipes(load_space(name))]  # noqa: E731
    assert kinds("peft") == [("lora_bias", 32, "attention+mlp"), ("bitfit", 8, "attention"), ("norm", 8, "attention")]
    assert kinds("default") == []  # full is offered: partial could never cost more
    assert [(r.freeze, r.train_blocks) for r in plan._cost_recipes(load_space("quick"))] == [("partial", 2)]
    fixed = load_space("peft", fixed=["freeze=lora", "lora_targets=attention", "lora_rank=4"])
    assert kinds(fixed) == [("lora", 4, "attention")]
    assert plan._freeze_modes(load_space("peft")) == ("lora", "lora_bias", "bitfit", "norm", "linear_probe")


def test_a_stored_probe_keeps_its_mode_costs() -> None:
    stored = json.loads(json.dumps(dataclasses.asdict(PEFT_PROBE)))  # as the study holds it
    assert Probe(**stored) == PEFT_PROBE and Probe(**stored).mode("lora").epoch_seconds == 4.0


# -------------------------------------------------------------------------------------------------- priors


# Enough training images that every preset batch size gives an epoch 16+ steps: the batch rule stays quiet.
LARGE = dataclasses.replace(PROFILE, train=16 * 128)


def test_priors_fire_on_their_thresholds() -> None:
    names = lambda acc, profile=LARGE: [p.name for p in choose_priors(profile, _probe(acc))]  # noqa: E731
    assert names(0.99) == ["features-fit-well"]  # fit (0.99 - 0.4) / 0.6 = 0.98
    assert names(0.95) == []  # fit 0.92: fine-tuning still has room
    # The poor-fit and few-images rules were removed: the quality benchmark did not support them (docs/controller.md).
    assert names(0.6) == [] and names(0.8, dataclasses.replace(PROFILE, train=30)) == ["few-steps-per-epoch"]
    assert names(0.6, dataclasses.replace(LARGE, train=LARGE.train - 1)) == ["few-steps-per-epoch"]


def test_a_small_training_split_gets_batches_with_enough_steps_and_the_portfolio_follows() -> None:
    space = load_space("default")
    narrowed, skipped = apply_priors(space, choose_priors(dataclasses.replace(PROFILE, train=600), PROBE))
    assert _param(narrowed, "batch_size").choices == (16, 32) and skipped == ()  # 600 / 16 steps: batch <= 37
    assert [e["batch_size"] for e in narrowed.portfolio] == [32] * len(space.portfolio)  # 64 -> 32, not dropped
    tiny, _ = apply_priors(space, choose_priors(dataclasses.replace(PROFILE, train=24), PROBE))
    assert _param(tiny, "batch_size").choices == (16,)  # none is small enough: the smallest offered stays
    plan_line = "optimizer steps per epoch: 19 at batch 32"
    assert plan_line not in plan.Plan(PROFILE, PROBE, 4, "median").describe()
    assert plan_line in plan.Plan(PROFILE, PROBE, 4, "median", steps_per_epoch={32: 19}).describe()


def test_strong_features_narrow_the_default_space_consistently() -> None:
    space = load_space("default")
    priors = choose_priors(PROFILE, _probe(0.99))
    narrowed, skipped = apply_priors(space, priors)
    assert _param(narrowed, "freeze").choices == ("linear_probe", "partial", "lp_ft")  # preset order kept
    assert _param(narrowed, "lr").high == 1e-3 and _param(narrowed, "lr").low == _param(space, "lr").low
    assert _param(narrowed, "head_lr_ratio").when == {"freeze": ("partial", "lp_ft")}  # "full" left its condition
    freezes = [e["freeze"] for e in narrowed.portfolio]
    assert sorted(freezes) == sorted(e["freeze"] for e in space.portfolio if e["freeze"] != "full")  # full FT dropped
    assert freezes[0] == "linear_probe"  # the prior's first: the (learned) portfolio's linear probe moves ahead
    assert all(e["lr"] <= 1e-3 for e in narrowed.portfolio)  # clipped into the new range
    assert skipped == ()


# A rule's edits, by hand (no shipped rule removes the linear probe or caps epochs any more): the narrowing itself.
DEEPER_EDITS = {"freeze": {"choices": ["full", "lp_ft", "partial"]}, "lr": {"low": 1e-4}}
DEEPER = Prior("deeper", "test", "test", DEEPER_EDITS, first=("full", "lp_ft"))
SHORTER = Prior("shorter", "test", "test", {"epochs": {"high": 6}, "weight_decay": {"low": 1e-4}})


def test_a_narrowed_choice_drops_its_portfolio_entry_and_reorders_the_rest() -> None:
    narrowed, _ = apply_priors(load_space("default"), [DEEPER])
    assert "linear_probe" not in _param(narrowed, "freeze").choices
    assert _param(narrowed, "lr").low == 1e-4
    assert narrowed.portfolio[0]["freeze"] == "full"  # deeper tuning first


def test_priors_never_touch_what_the_user_set_and_never_widen() -> None:
    space = load_space("default", fixed=["freeze=full"], overrides=["lr.high=1e-4"])
    priors = choose_priors(LARGE, _probe(0.99))
    narrowed, skipped = apply_priors(space, priors, keep=["freeze", "lr"])
    assert narrowed.params == space.params
    assert skipped == ("features-fit-well: freeze left as is (set by the user)", "features-fit-well: lr left as is "
                       "(set by the user)")  # fmt: skip
    quick = load_space("quick")  # epochs 2-4 already below the cap of 6
    narrowed, skipped = apply_priors(quick, [SHORTER])
    assert _param(narrowed, "epochs").high == 4 and "shorter: epochs left as is (already within)" in skipped


# ----------------------------------------------------------------------------------------- probe (real model)


def test_a_30_second_budget_fits_the_demo_on_a_quiet_machine() -> None:
    """Issue 14: a 30 s --timeout runs and returns a model. The demo's quiet-machine measurements (docs/controller.md,
    `make demo` on 2 quiet cores): 6.5 s preparation and probe (the old, slower probe), a 7.5 s full fine-tuning
    epoch, 1.2 ms per evaluated image (its 300 s plan reserved 19.6 s = 8 s + 3 x 1.2 ms x 720 + 9 s)."""
    demo = DataProfile(train=1077, val=360, test=360, classes=10, smallest_class=104, largest_class=109, image_size=48)
    measured = dataclasses.replace(PROBE, epoch_seconds_full=7.5, epoch_seconds_head=0.6, eval_seconds_per_image=0.0012)
    budget = plan_budget(30, measured, demo, spent=6.5, max_epochs=6, pruner="median")
    assert budget.max_epochs >= 1 and budget.search >= budget.epoch_seconds  # one fine-tuning epoch fits
    assert budget.wrap_up < 10
    # The quiet machine's probe measured 7 s, but one epoch took 21 s in a slower hour (issue 14's refusal): the
    # search then trains in rounds of fewer examples rather than refusing the budget.
    slow = dataclasses.replace(measured, epoch_seconds_full=21.0)
    rounds = plan_budget(30, slow, demo, spent=7, max_epochs=6, pruner="median", smallest_round=64)
    assert rounds.max_epochs == 3 and 64 <= rounds.epoch_examples < demo.train


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    root = make_image_folder(tmp_path_factory.mktemp("plan") / "data", per_class=8, with_test=True)
    return prepare(SearchConfig(model="test_resnet", data=root, pretrained=False, image_size=16, device="cpu"))


@pytest.mark.slow  # trains: a few steps of a real (tiny) model
def test_probe_measures_fit_and_epoch_cost_without_building_the_feature_cache(tiny_setup) -> None:
    measured = probe(tiny_setup, seed=0, steps=30)
    assert tiny_setup.feature_cache.nbytes == 0  # not forced: a head-only trial builds it when it needs it
    assert measured.linear_probe_accuracy == 1.0  # one colour per class: separable even with random weights
    assert measured.chance == pytest.approx(1 / 3) and measured.fit == 1.0 and measured.examples == 24 + 6
    assert measured.epoch_seconds_full > 0 and measured.epoch_seconds_head > 0 and measured.eval_seconds_per_image > 0
    train, val = tiny_setup.feature_cache.splits()  # the whole (small) data set: the sample was all of it
    assert _linear_probe(train, val, 3, seed=0, steps=30) == measured.linear_probe_accuracy  # seeded


def test_probe_measures_only_what_a_decision_uses(tiny_setup, monkeypatch) -> None:
    """No --timeout: no timed steps (only the budget uses them); priors off: no linear probe; a resumed study's
    stored probe is kept and only what it lacks is measured."""

    def never(*args, **kwargs):
        raise AssertionError("measured although no decision uses it")

    monkeypatch.setattr(step_cost, "step_cost", never)
    monkeypatch.setattr(step_cost, "eval_seconds_per_image", never)
    tiny_setup = dataclasses.replace(tiny_setup, feature_cache=None)  # the probe computes its sample's features
    linear_only = probe(tiny_setup, seed=0, steps=5, costs=False)
    assert linear_only.linear_probe_accuracy is not None and not linear_only.has_costs
    monkeypatch.setattr(probe_module, "_linear_probe", never)
    assert probe(tiny_setup, costs=False, previous=linear_only) is linear_only  # nothing left to measure
    monkeypatch.setattr(step_cost, "step_cost", lambda setup, recipe, *, batch_size, affordable=None: (0.01, 1, None))
    completed = probe(tiny_setup, linear_probe=False, costs=True, previous=linear_only)
    assert completed.linear_probe_accuracy == linear_only.linear_probe_accuracy  # kept, not measured again
    eval_cost = linear_only.eval_seconds_per_image  # from the probe's own feature pass: not timed again
    assert completed.epoch_seconds_full == pytest.approx(0.01 * 24 + eval_cost * 6)
    assert probe(tiny_setup, linear_probe=False, costs=False).linear_probe_accuracy is None


@pytest.mark.slow  # trains: a few steps of each offered mode on a real (tiny) model
def test_the_probe_times_each_offered_mode_and_the_plan_explains_them(tiny_setup, monkeypatch) -> None:
    space = load_space("peft")
    made, _ = plan.make_plan(
        tiny_setup, space, {}, seed=0, timeout=600, spent=lambda: 1.0, max_epochs=5, pruner="median",
        priors_off="test",
    )  # fmt: skip
    costs = {c.mode: c for c in made.probe.modes}
    assert set(costs) == {"full", "lora", "bitfit", "norm"}  # the offered families, and full for reference
    total = sum(p.numel() for p in tiny_setup.base_model.parameters())
    assert costs["full"].trainable == costs["full"].parameters == total
    assert 0 < costs["bitfit"].trainable < costs["norm"].trainable < costs["lora"].trainable < total  # BN: 2 each
    assert "LoRA r32" in costs["lora"].timed and "attention+mlp" in costs["lora"].timed  # its costliest recipe
    assert all(c.seconds_per_example > 0 and c.peak_bytes is None for c in costs.values())  # CPU: no peak memory
    assert made.probe.epoch_seconds_full == costs["full"].epoch_seconds
    expected = max(max(c.epoch_seconds for m, c in costs.items() if m != "full"), made.probe.epoch_seconds_head)
    assert made.budget.epoch_seconds == pytest.approx(EPOCH_SAFETY * expected)  # full is not offered
    text = made.describe()
    for mode in ("full", "lora", "bitfit", "norm"):
        assert f"  {mode}: " in text
    assert "x full)" in text and "% of " in text and "(peak memory: CUDA only)" in text
    assert f"({made.budget.epoch_mode}" in text or "head only" in text
    # A resumed study reuses every stored mode cost; a space offering one more family times only that one.
    timed = []
    monkeypatch.setattr(
        step_cost, "step_cost", lambda setup, recipe, *, batch_size, affordable=None: timed.append(recipe.freeze)
    )
    attrs = json.loads(json.dumps({"plan": made.record()}))
    again, _ = plan.make_plan(tiny_setup, space, attrs, seed=0, timeout=600, spent=lambda: 1.0, max_epochs=5,
                              pruner="median", priors_off="test")  # fmt: skip
    assert again.reused and again.probe == made.probe and timed == []
    monkeypatch.setattr(step_cost, "step_cost", lambda setup, recipe, *, batch_size, affordable=None: (
        timed.append(recipe.freeze) or (0.01, 1, None)))  # fmt: skip
    wider, _ = plan.make_plan(tiny_setup, load_space("quick"), attrs, seed=0, timeout=600, spent=lambda: 1.0,
                              max_epochs=5, pruner="median", priors_off="test")  # fmt: skip
    assert timed == ["partial"] and {c.mode for c in wider.probe.modes} == {*costs, "partial"}


def test_the_feature_cache_adopts_the_probes_sample(tiny_setup, monkeypatch) -> None:
    """The probe's features are not computed twice: a head-only trial's cache build computes only the rows outside
    the probe's sample, and the cache equals one built from scratch."""
    monkeypatch.setattr(probe_module, "PROBE_TRAIN_EXAMPLES", 12)  # half of the 24 train images
    s = tiny_setup

    def new_cache() -> features.FeatureCache:
        return features.FeatureCache(s.base_model, s.dataset, s.task, s.spec, device=s.device)

    fresh = dataclasses.replace(s, feature_cache=new_cache())
    probe(fresh, seed=0, steps=5, costs=False)
    computed, original = [], features.pooled

    def counting(model, task, split, *args, **kwargs):
        computed.append(len(split))
        return original(model, task, split, *args, **kwargs)

    monkeypatch.setattr(features, "pooled", counting)
    train, val = fresh.feature_cache.splits()
    assert computed == [12]  # the train rows outside the sample; val (6 images) was sampled whole
    scratch_train, scratch_val = new_cache().splits()
    assert torch.allclose(train.images, scratch_train.images, atol=1e-5)
    assert torch.allclose(val.images, scratch_val.images, atol=1e-5)
    assert torch.equal(train.labels, scratch_train.labels) and torch.equal(val.labels, scratch_val.labels)


def test_a_small_first_sample_decides_when_its_fit_settles_the_priors(tiny_setup, monkeypatch) -> None:
    """The linear probe's first part (12 of the 24 train images) decides alone when ``settled`` says so; otherwise
    the rest of the sample is added, its first part not computed again; the cache adopts what was computed."""
    monkeypatch.setattr(probe_module, "FIRST_TRAIN_EXAMPLES", 12)
    computed, original = [], features.pooled

    def counting(model, task, split, *args, **kwargs):
        computed.append(len(split))
        return original(model, task, split, *args, **kwargs)

    monkeypatch.setattr(features, "pooled", counting)

    def measured(settled: bool) -> tuple[Probe, features.FeatureCache]:
        s = tiny_setup
        cache = features.FeatureCache(s.base_model, s.dataset, s.task, s.spec, device=s.device)
        computed.clear()
        result = probe(dataclasses.replace(s, feature_cache=cache), seed=0, steps=5, costs=False,
                       settled=lambda fit: settled)  # fmt: skip
        return result, cache

    early, cache = measured(True)
    assert early.examples == 12 + 6 and computed == [12, 6]  # val's 6 images are within its first part
    computed.clear()
    train, _ = cache.splits()
    assert computed == [12] and len(train.labels) == 24  # the cache computes the 12 train rows the probe did not
    whole, _ = measured(False)
    assert whole.examples == 24 + 6 and computed == [12, 6, 12]  # then the other 12 train rows, once

    # A short budget: the rest's pooled pass, predicted from the first part's pace, is more than it affords.
    asked: list[float] = []
    computed.clear()
    uncached = dataclasses.replace(tiny_setup, feature_cache=None)  # another test may have built the fixture's
    short = probe(uncached, seed=0, steps=5, costs=False, settled=lambda fit: False,
                  affordable=lambda seconds: asked.append(seconds) or False)  # fmt: skip
    assert short.examples == 12 + 6 and computed == [12, 6] and len(asked) == 1 and asked[0] > 0
    computed.clear()
    roomy = probe(uncached, seed=0, steps=5, costs=False, settled=lambda fit: False, affordable=lambda s: True)
    assert roomy.examples == 24 + 6 and computed == [12, 6, 12]


@pytest.mark.slow  # trains: a few steps of a real (tiny) model
def test_a_short_budget_leaves_out_the_timings_it_cannot_afford(tiny_setup, monkeypatch) -> None:
    """The probe's optional parts ask the budget's allowance in turn: the linear probe's second sample, the
    evaluation timing (else the pooled pass's pace stands in) and the step timing at the trials' own batch (else
    the small batch's pace stands). Refused, none of them runs; granted, each does."""
    monkeypatch.setattr(step_cost, "CHEAP_STEP_SECONDS", math.inf)  # every step is cheap: the re-timing is asked
    monkeypatch.setattr(probe_module, "FIRST_TRAIN_EXAMPLES", 12)  # a first sample of half the 24 train images
    timed: list[str] = []
    fastest = step_cost.fastest
    monkeypatch.setattr(
        step_cost, "fastest", lambda run, device, **kw: timed.append("run") or fastest(run, device, **kw)
    )
    setup = dataclasses.replace(tiny_setup, feature_cache=None)
    asked: list[float] = []
    short = probe(setup, seed=0, steps=5, settled=lambda fit: False, affordable=lambda s: asked.append(s) or False)
    assert len(asked) == 3 and all(seconds > 0 for seconds in asked)  # second sample, evaluation, batch-64 steps
    assert timed == ["run"]  # the small steps alone: the full fine-tune's cost must be measured
    assert short.examples == 12 + 6  # the first sample's fit
    pace = short.eval_seconds_per_image  # the pooled pass's: per example of the 18 it saw
    assert short.epoch_seconds_full == pytest.approx(short.modes[0].seconds_per_example * 24 + pace * 6)
    timed.clear()
    roomy = probe(setup, seed=0, steps=5, settled=lambda fit: False, affordable=lambda s: True)
    assert timed == ["run"] * 3 and roomy.examples == 24 + 6  # evaluation, small steps, the trials' batch


def test_sample_rows_covers_every_class_within_its_bound() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 9 + [3] * 1)
    rows = sample_rows(labels, 100, 4)
    assert len(rows) <= 100 and set(labels[rows].tolist()) == {0, 1, 2, 3}  # the single example of 3 too
    assert rows.unique().numel() == len(rows) and rows.tolist() == sorted(rows.tolist())
    counts = torch.bincount(labels[rows]).tolist()
    assert counts[0] > counts[1] > counts[2] >= counts[3] == 1  # each class about its share
    zeros = rows[labels[rows] == 0]
    assert zeros.min() < 100 and zeros.max() > 800  # evenly spread over the class, not its first rows
    assert sample_rows(labels, 5000, 4).tolist() == list(range(1000))  # small enough: all of it
    assert len(sample_rows(labels, 3, 4)) == 3  # more classes than room: the bound holds
    assert len(sample_rows(torch.zeros(50, 7, dtype=torch.long), 10, 2)) == 10  # per-token labels


@pytest.mark.slow
def test_probe_epoch_cost_ignores_a_step_slowed_by_another_process(tiny_setup, monkeypatch) -> None:
    """A step stalled by a neighbour (CI's test suite on the same cores) must not cap every trial's epochs:
    the probe keeps the fastest timed step, so one 0.5 s stall leaves the estimate where it was."""
    baseline = train_seconds_per_image(tiny_setup, batch_size=8)
    forward, calls = type(tiny_setup.base_model).forward, []

    def stalled_once(self, x):
        calls.append(1)
        if len(calls) == 3:  # the second timed step (the first call is the warm-up)
            time.sleep(0.5)
        return forward(self, x)

    monkeypatch.setattr(type(tiny_setup.base_model), "forward", stalled_once)
    stalled = train_seconds_per_image(tiny_setup, batch_size=8)
    assert len(calls) == 1 + step_cost.TIMED_STEPS
    assert stalled < baseline + 0.5 / 8 / 4  # a mean over the 3 steps would be >= baseline + 0.5 s / 8 images / 3


def test_a_plan_in_rounds_gives_every_trial_epochs_of_fewer_examples(tiny_setup, monkeypatch) -> None:
    # The tiny model trains in milliseconds: the probe is made to report a 40 s pass over its 24 images.
    monkeypatch.setattr(plan, "probe", lambda *a, **k: dataclasses.replace(PROBE, epoch_seconds_full=40.0))
    space = load_space("default", fixed=("batch_size=4",))
    made, shaped = plan.make_plan(
        tiny_setup, space, {}, seed=0, timeout=60, spent=lambda: 10.0, max_epochs=6, pruner="median"
    )  # fmt: skip
    examples = made.budget.epoch_examples
    assert 4 <= examples < 24 and made.max_epochs == 3  # 3 rounds of fewer examples than a pass
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = [shaped.sample(study.ask()) for _ in range(12)]
    assert {t["freeze"] for t in trials} == {"linear_probe", "partial", "full", "lp_ft"}
    for chosen in trials:  # a linear probe's passes (0.1 s, PROBE's head-only epoch) fit: it keeps them whole
        assert chosen.get("epoch_examples", 0) == (0 if chosen["freeze"] == "linear_probe" else examples)
        assert chosen["epochs"] <= 3
    full = next(t for t in trials if t["freeze"] == "full")
    assert Recipe.from_params(full).describe().count(f"epochs of {examples} examples") == 1
    assert f"3 epoch(s) of {examples} examples (a pass does not fit)" in made.describe()
    assert f"{math.ceil(examples / 4)} at batch 4" in made.describe()


def test_a_one_trial_budget_leaves_out_a_costly_head_only_trial_and_says_so(tiny_setup, monkeypatch) -> None:
    space = load_space("text")  # its portfolio's first recipe is a linear probe, then fine-tunes
    assert space.portfolio[0]["freeze"] == "linear_probe"

    def planned(head_seconds: float, *, timeout: float = 60, accuracy: float = 0.6) -> tuple[plan.Plan, object]:
        measured = dataclasses.replace(PROBE, epoch_seconds_full=10.0, epoch_seconds_head=head_seconds,
                                       linear_probe_accuracy=accuracy)  # fmt: skip
        monkeypatch.setattr(plan, "probe", lambda *a, **k: measured)
        return plan.make_plan(tiny_setup, space, {}, seed=0, timeout=timeout, spent=lambda: 5.0, max_epochs=6,
                              pruner="median")  # fmt: skip

    made, shaped = planned(5.0)  # one trial fits ~40 s of search; a linear probe trial would take 5 s of it
    assert made.budget.expected_trials == 1
    assert made.held_back == ("linear_probe",)
    assert "portfolio: linear_probe left out: one trial fits" in made.describe()
    # Held back for this run only: the space, whose portfolio the study records, keeps it.
    assert [e["freeze"] for e in shaped.portfolio] == [e["freeze"] for e in space.portfolio]
    for kept, reason in (
        (planned(0.5), "a head-only trial that costs ~1 % of the search is cheap insurance"),
        (planned(5.0, timeout=600), "several trials fit: the linear probe is one of them"),
        (planned(5.0, accuracy=1.0), "features-fit-well: the linear probe is a contender, first in the portfolio"),
    ):
        assert kept[1].portfolio[0]["freeze"] == "linear_probe" and not kept[0].held_back, reason
        assert not kept[0].left_out, reason
    made, shaped = plan.make_plan(tiny_setup, space, {}, seed=0, timeout=60, spent=lambda: 5.0, max_epochs=6,
                                  pruner="median", priors_off="your own space is authoritative")  # fmt: skip
    assert not made.held_back  # a user's own space keeps its portfolio as written


def test_profile_counts_classes_and_imbalance(tiny_setup) -> None:
    profile = profile_data(tiny_setup.dataset)
    assert (profile.train, profile.val, profile.test, profile.classes) == (24, 6, 6, 3)
    assert profile.imbalance == 1.0 and profile.image_size == 16


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_timed_search_ends_within_its_budget_and_a_resume_reuses_the_probe(tmp_path: Path) -> None:
    """--timeout covers the whole call (preparation, probe, search, test score, report), within +5%.

    The budget is the API call's: interpreter start-up and imports come before it (about 3 s unloaded).
    """
    data = make_image_folder(tmp_path / "data", per_class=8, with_test=True)
    timeout = 30.0  # issue 14: a 30 s budget runs and returns a model; 5% of it absorbs a loaded machine's jitter
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu", trials=None, timeout=timeout,
        run_dir=tmp_path / "run", max_epochs=3,
    )  # fmt: skip
    plans: list[plan.Plan] = []
    started = time.monotonic()
    result = run_search(cfg, on_plan=plans.append)
    elapsed = time.monotonic() - started
    assert elapsed <= 1.05 * timeout, f"{elapsed:.1f}s for a {timeout:.0f}s budget; plan: {plans[0].describe()}"
    assert len(result.study.get_trials(states=(TrialState.COMPLETE,))) >= 2
    # The report's imports (3.6 s) loaded while the trials trained, and were joined before the wrap-up began.
    assert "autoft-preload-importance" not in {thread.name for thread in threading.enumerate()}
    assert plans[0].budget is not None and plans[0].budget.max_epochs <= 3 and not plans[0].reused
    recorded = result.study.user_attrs["plan"]
    assert recorded["probe"]["linear_probe_accuracy"] == plans[0].probe.linear_probe_accuracy
    assert recorded["budget"]["max_epochs"] == plans[0].budget.max_epochs
    assert recorded["priors"] == [p.name for p in plans[0].priors]
    # The same study again, one more trial, no timeout: the stored probe shapes the same space.
    finished = len(result.study.trials)
    run_search(dataclasses.replace(cfg, timeout=None, trials=finished + 1), on_plan=plans.append)
    assert plans[1].reused and plans[1].probe == plans[0].probe and plans[1].budget is None
    assert [p.name for p in plans[1].priors] == [p.name for p in plans[0].priors]


@pytest.mark.slow
def test_explain_prints_the_plan_and_no_priors_turns_them_off(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8)
    args = ["search", "--model", "test_resnet", "--no-pretrained", "--data", str(data), "--image-size", "16"]
    args += ["--trials", "1", "--max-epochs", "1", "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--explain", "--no-priors"]) == 0
    err = capsys.readouterr().err
    assert "linear probe skipped (priors off)" in err and "priors: off (--no-priors)" in err
    assert "epoch cost not measured (no --timeout)" in " ".join(err.split())  # only a budget uses it (lines wrap)
    assert "budget: none (no --timeout)" in err
    # A budget that cannot fit one epoch after preparing and probing: one sentence, exit 2, before any trial.
    assert main([*args, "--timeout", "1s", "--run-dir", str(tmp_path / "short")]) == 2
    assert "--timeout 1s is too short" in capsys.readouterr().err
    assert not (tmp_path / "short" / "best").exists()


@pytest.mark.slow
def test_a_trial_the_budget_stops_is_complete_noted_and_may_become_best(tmp_path: Path) -> None:
    """The pruner's PRUNED is for trials judged bad; one the clock stopped keeps its best epoch as a real model.
    (A linear probe: the search's last fine-tune would fit its steps to the time left instead, test_stretch.)"""
    data = make_image_folder(tmp_path / "data", per_class=8, with_test=True)
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu", run_dir=tmp_path / "run"
    ).resolved()
    cfg.run_dir.mkdir()
    space = load_space("default", fixed=("freeze=linear_probe", "epochs=3"))
    study = open_study(cfg)
    setups = {cfg.model: prepare(cfg)}
    spent = Budget(search_end=time.time(), epoch_seconds=1.0)  # already spent: the trial ends after its first epoch
    execute = _LocalTrial(TrialRunner(cfg, setups, budget=spent), RunFolder(cfg, setups, study), lambda event: None)
    local.optimize(study, space, execute, n_trials=1, timeout=None, on_trial_end=lambda t: None, should_stop=bool)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["stopped_by_budget"] == "epoch 1 of 3"
    assert len(trial.user_attrs["val_loss"]) == 1
    assert json.loads((cfg.run_dir / "best" / "config.json").read_text())["trial"] == 0
    assert "stopped by --timeout after epoch 1 of 3" in results.trial_row(trial)["note"]


class _EveryEpochFits(Budget):
    """A plan whose epochs always look as if they fit: only the passed deadline can stop a trial mid-epoch."""

    def next_epoch_fits(self, last_epoch_seconds: float) -> bool:
        return True


def test_a_trial_whose_next_epoch_does_not_fit_trains_on_while_a_part_of_one_does(tmp_path: Path) -> None:
    """No whole epoch fits (12 s planned, 6 s left), but a quarter of one does: the trial goes on until that no
    longer holds (3 s before the end), instead of stopping after its first epoch with the search time unused. (A
    head-only trial: the search's last fine-tune fits its steps to the time left instead, test_stretch.)"""
    data = make_image_folder(tmp_path / "data", per_class=8)
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu", run_dir=tmp_path / "run"
    ).resolved()
    setups = {cfg.model: prepare(cfg)}
    budget = Budget(search_end=time.time() + 6, epoch_seconds=12.0)
    epochs = 100_000  # more than 3 s can hold at any speed: 500 head-only epochs of 24 images took 2.5 s in a CI run
    params = {"freeze": "linear_probe", "epochs": epochs, "batch_size": 4, "lr": 1e-3, "augment": "none"}
    outcome = TrialRunner(cfg, setups, budget=budget)(0, params, lambda epoch, metrics: False)
    assert 2 <= len(outcome.history) < epochs and not outcome.stopped_early
    assert outcome.notes["stopped_by_budget"] == f"epoch {len(outcome.history)} of {epochs}"
    assert time.time() <= budget.search_end + 1.0


def test_a_trial_the_deadline_stops_mid_epoch_is_complete_and_noted(tmp_path: Path) -> None:
    """An epoch slower than planned (a busier machine) does not carry the search past its budget."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    cfg = SearchConfig(
        model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu", run_dir=tmp_path / "run"
    ).resolved()
    setups = {cfg.model: prepare(cfg)}
    runner = TrialRunner(cfg, setups, budget=_EveryEpochFits(search_end=time.time() - 1, epoch_seconds=1e-3))
    params = {"freeze": "full", "epochs": 3, "batch_size": 4, "lr": 1e-3, "augment": "none"}
    outcome = runner(0, params, lambda epoch, metrics: False)
    assert not outcome.stopped_early and len(outcome.history) == 1 and outcome.best_state
    assert outcome.notes["stopped_by_budget"] == "1 of 3 epochs (the deadline passed mid-epoch)"
