"""Look before searching: measure the data and the model, shape the space with priors, plan the time budget.

Before the first trial the controller builds a :class:`Plan` (docs/controller.md):

1. :func:`profile_data` -- images, classes, imbalance, resolution (counts only; nothing is trained).
2. :func:`probe` -- a linear probe on the pooled pretrained features (the :class:`~autoft.features.FeatureCache`
   the head-only trials use anyway) and the measured cost of one epoch: full fine-tuning (a few timed
   forward+backward+step passes on a copy of the model, extrapolated to the train split), head-only
   training and evaluation.
3. :func:`choose_priors` -- small named rules, each with a threshold and a reason, that narrow the search
   space (never widen it; never a knob the user set with ``--set``/``--fix``; never a user's own space file).
4. :func:`plan_budget` -- with ``--timeout``: reserve the wrap-up (test score, report) and what the preparation
   and probe already spent, then fit the epochs per trial, the pruner and the expected trial count to what is left.

A resumed search reuses the stored probe (study user attr ``plan``), so it shapes the same space.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoft import data, features, models, optim
from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.space import Param, SearchSpace, Space

__all__ = [
    "BudgetPlan",
    "DataProfile",
    "Plan",
    "Prior",
    "Probe",
    "apply_priors",
    "choose_priors",
    "make_plan",
    "plan_budget",
    "probe",
    "profile_data",
    "stored",
]

# --------------------------------------------------------------------------------------------- measurements


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

    @property
    def imbalance(self) -> float:
        """Largest over smallest class size in the train split (1.0 = balanced)."""
        return self.largest_class / max(1, self.smallest_class)

    @property
    def images_per_class(self) -> float:
        return self.train / max(1, self.classes)


def profile_data(dataset: data.Dataset) -> DataProfile:
    """Count the data set's images per split and per class.

    >>> profile_data(ds).classes  # doctest: +SKIP
    3
    """
    counts = torch.bincount(dataset.train.labels, minlength=len(dataset.classes))
    return DataProfile(
        train=len(dataset.train),
        val=len(dataset.val),
        test=len(dataset.test) if dataset.test is not None else 0,
        classes=len(dataset.classes),
        smallest_class=int(counts.min()),
        largest_class=int(counts.max()),
        image_size=dataset.image_size,
    )


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


def probe(setup: Any, *, seed: int = 0, steps: int = 100, timed_steps: int = 5, batch_size: int = 64) -> Probe:
    """Linear probe on the frozen features and the measured epoch cost, for one prepared model (a ``Setup``).

    ``setup`` needs ``base_model``, ``dataset``, ``mean``, ``std``, ``device`` and optionally ``feature_cache``.
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
    train_features, val_features = _pooled_features(setup)
    head_started = time.perf_counter()
    accuracy = _linear_probe(train_features, val_features, len(dataset.classes), seed=seed, steps=steps)
    head_seconds = time.perf_counter() - head_started
    eval_per_image = _eval_seconds_per_image(setup, batch_size=batch_size)
    train_per_image = _train_seconds_per_image_fitting(setup, steps=timed_steps, batch_size=batch_size)
    val_seconds = eval_per_image * len(dataset.val)
    cached = getattr(setup, "feature_cache", None) is not None and setup.feature_cache.splits() is not None
    # Head-only epoch: a pass of the head over cached features (~ the probe's steps), else a frozen forward pass.
    head_epoch = head_seconds / steps * math.ceil(len(dataset.train) / batch_size) if cached else None
    chance = torch.bincount(dataset.val.labels).max().item() / max(1, len(dataset.val))
    return Probe(
        linear_probe_accuracy=accuracy,
        chance=chance,
        epoch_seconds_full=train_per_image * len(dataset.train) + val_seconds,
        epoch_seconds_head=(head_epoch if head_epoch is not None else eval_per_image * len(dataset.train))
        + (0.0 if cached else val_seconds),
        eval_seconds_per_image=eval_per_image,
        seconds=time.perf_counter() - started,
    )


# Without the feature cache the probe computes its own features: on at most this many images (bounded cost).
FALLBACK_TRAIN_IMAGES, FALLBACK_VAL_IMAGES = 10_000, 5_000


def _pooled_features(setup: Any) -> tuple[data.ImageSet, data.ImageSet]:
    """Train and val pooled features: the search's feature cache, or (when it refuses, e.g. dropout in the
    model) the same features computed here in eval mode, where dropout is off anyway."""
    cache = getattr(setup, "feature_cache", None)
    splits = cache.splits() if cache is not None else None
    if splits is not None:
        return splits
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    out = []
    for split, limit in ((setup.dataset.train, FALLBACK_TRAIN_IMAGES), (setup.dataset.val, FALLBACK_VAL_IMAGES)):
        rows = torch.linspace(0, len(split) - 1, min(len(split), limit)).long()  # evenly spread: every class
        out.append(data.ImageSet(_pooled(model, split.images[rows], setup), split.labels[rows].to(setup.device)))
    return out[0], out[1]


@torch.no_grad()
def _pooled(model: nn.Module, images: torch.Tensor, setup: Any, chunk: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(images), chunk):
        batch = data.normalize(images[start : start + chunk].to(setup.device), mean=setup.mean, std=setup.std)
        with features.autocast(setup.device):
            out.append(model.forward_head(model.forward_features(batch), pre_logits=True).float())
    return torch.cat(out)


def _linear_probe(
    train: data.ImageSet, val: data.ImageSet, num_classes: int, *, seed: int, steps: int, batch_size: int = 512
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
def _eval_seconds_per_image(setup: Any, *, batch_size: int) -> float:
    """Seconds per image of an eval-mode forward pass (one warm-up batch, the faster of two timed val batches)."""
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    images = setup.dataset.val.images[:batch_size]
    batch = data.normalize(images.to(setup.device), mean=setup.mean, std=setup.std)
    with features.autocast(setup.device):
        return _fastest(lambda: model(batch), setup.device, repeats=2) / len(images)


def _train_seconds_per_image_fitting(setup: Any, *, steps: int, batch_size: int) -> float:
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


def _train_seconds_per_image(setup: Any, *, steps: int, batch_size: int) -> float:
    """Seconds per image of the fastest full fine-tuning step (forward, backward, AdamW step) on a copy of the model."""
    model = copy.deepcopy(setup.base_model).to(setup.device)
    models.apply_freeze(model, train_blocks=None)
    models.set_train_mode(model, freeze_bn_stats=False)
    optimizer = optim.create_optimizer(model, Recipe(batch_size=batch_size))
    images = setup.dataset.train.images[:batch_size]
    labels = setup.dataset.train.labels[:batch_size].to(setup.device)
    batch = data.normalize(images.to(setup.device), mean=setup.mean, std=setup.std)

    def step() -> None:
        with features.autocast(setup.device):
            loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _fastest(step, setup.device, repeats=steps) / len(images)


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


# ------------------------------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class Prior:
    """One rule that fired: its name, the measurement against its threshold, why, and the edits it made.

    ``edits`` maps a parameter to the narrowed spec: ``{"choices": [...]}`` or ``{"low": x}``/``{"high": x}``;
    ``first`` names portfolio recipes (by freeze mode) moved to the front.
    """

    name: str
    because: str  # the measurement and the threshold, e.g. "linear probe fit 0.97 >= 0.95"
    reason: str  # one line: why this edit helps, with the source
    edits: Mapping[str, Mapping[str, Any]]
    first: tuple[str, ...] = ()


# The threshold, named once (docs/controller.md gives the evidence). Two more rules were tried and removed because
# benchmarks/quality.py did not support them (docs/controller.md, "Rules tried and removed"): "features-fit-poorly"
# (fit < 0.5: no linear probe, lr >= 1e-4) and "few-images" (< 20 per class: epochs <= 6, weight decay >= 1e-4).
STRONG_FIT = 0.95  # linear-probe fit from which the pretrained features already separate the classes


def choose_priors(profile: DataProfile, measured: Probe) -> tuple[Prior, ...]:
    """The rules whose thresholds the measurements cross, in order (later rules narrow further).

    ``profile`` is measured and printed for every search, but no rule uses it: the one data rule tried
    ("few-images") did not survive the benchmark.

    >>> [p.name for p in choose_priors(profile, dataclasses.replace(measured, linear_probe_accuracy=0.99))]
    ... # doctest: +SKIP
    ['features-fit-well']
    """
    fit = measured.fit
    rules: list[Prior] = []
    if fit >= STRONG_FIT:
        rules.append(
            Prior(
                "features-fit-well",
                f"linear probe fit {fit:.2f} >= {STRONG_FIT}",
                "features already separate the classes: keep them (linear probe, LP-FT, shallow partial tuning; "
                "Kumar et al. 2022 LP-FT) and use lower rates (Li et al. 2020: similar domains want smaller lr)",
                {"freeze": {"choices": ["linear_probe", "lp_ft", "partial"]}, "lr": {"high": 1e-3}},
                first=("linear_probe", "lp_ft"),
            )
        )
    return tuple(rules)


def apply_priors(
    space: SearchSpace, priors: Sequence[Prior], *, keep: Sequence[str] = ()
) -> tuple[SearchSpace, tuple[str, ...]]:
    """The space with each prior's edits applied, and a note for every edit skipped.

    An edit only narrows: choices are intersected (order kept), a bound moves inwards. It is skipped when the
    parameter is in ``keep`` (the user's ``--set``/``--fix``), fixed, missing, or would be left empty.

    >>> narrowed, skipped = apply_priors(load_space("default"), priors)  # doctest: +SKIP
    """
    skipped: list[str] = []
    for prior in priors:
        for name, edit in prior.edits.items():
            param = next((p for p in space.params if p.name == name), None)
            narrowed = (
                "set by the user" if name in keep else "not searched" if param is None else _narrowed(param, edit)
            )
            if isinstance(narrowed, str):
                skipped.append(f"{prior.name}: {name} left as is ({narrowed})")
                continue
            params = _conditions_within([narrowed if p.name == name else p for p in space.params])
            portfolio = _portfolio_within(params, space.portfolio)
            space = dataclasses.replace(space, params=params, portfolio=portfolio)
        space = _portfolio_first(space, prior.first, keep)
    return space, tuple(skipped)


def _narrowed(param: Param, edit: Mapping[str, Any]) -> Param | str:
    """The parameter narrowed by ``edit``, or why not (it already lies within, or nothing would be left)."""
    if param.kind == "categorical" and "choices" in edit:
        choices = tuple(c for c in param.choices if c in edit["choices"])  # the space's order
        if not choices or choices == param.choices:
            return "nothing would be left" if not choices else "already within"
        return dataclasses.replace(param, choices=choices)
    if param.kind in ("float", "int") and ("low" in edit or "high" in edit):
        low = max(param.low, edit.get("low", param.low))
        high = min(param.high, edit.get("high", param.high))
        if low > high or (low, high) == (param.low, param.high):
            return "nothing would be left" if low > high else "already within"
        return dataclasses.replace(param, low=type(param.low)(low), high=type(param.high)(high))
    return "not a searched range or choice"


def _portfolio_first(space: SearchSpace, freeze_modes: Sequence[str], keep: Sequence[str]) -> SearchSpace:
    if not freeze_modes or "freeze" in keep:
        return space
    rank = {mode: i for i, mode in enumerate(freeze_modes)}
    ordered = sorted(space.portfolio, key=lambda entry: rank.get(entry.get("freeze"), len(rank)))
    return dataclasses.replace(space, portfolio=tuple(ordered))


def _conditions_within(params: Sequence[Param]) -> tuple[Param, ...]:
    """Conditions follow a narrowed choice: values no longer offered leave ``when``; a parameter whose condition
    can no longer hold is dropped (e.g. ``train_blocks`` once ``partial`` is gone)."""
    kept: dict[str, Param] = {}
    for p in params:
        when = {}
        for other, allowed in p.when.items():
            source = kept.get(other)
            offered = source.choices if source is not None and source.kind == "categorical" else allowed
            when[other] = tuple(
                v for v in allowed if source is not None and (v in offered or source.kind != "categorical")
            )
        if all(when.values()):
            kept[p.name] = dataclasses.replace(p, when=when)
    return tuple(kept.values())


def _portfolio_within(params: Sequence[Param], portfolio: Sequence[Mapping[str, Any]]) -> tuple[dict, ...]:
    """Portfolio entries the narrowed space still allows: entries with a choice no longer offered go, numbers are
    clipped into the new ranges, and knobs the space dropped are left out."""
    by_name = {p.name: p for p in params}
    kept = []
    for entry in portfolio:
        values = {k: v for k, v in entry.items() if k in by_name}
        if any(by_name[k].kind == "categorical" and v not in by_name[k].choices for k, v in values.items()):
            continue
        for k, v in values.items():
            if by_name[k].kind in ("float", "int"):
                values[k] = type(v)(min(max(v, by_name[k].low), by_name[k].high))
        kept.append(values)
    return tuple(kept)


# ------------------------------------------------------------------------------------------------- budget

# One epoch of a sampled recipe may cost more than the probe's (stronger augmentation, smaller batches,
# evaluation variance): the plan counts each epoch at this multiple of the measured full fine-tuning epoch.
# Measured: the probe's estimate was within 3% of the real epoch (30.1 s vs 30.7 s, digits, 1 thread); 1.5
# left a third of a 2-minute budget unused, and a running trial is judged by its own pace anyway.
EPOCH_SAFETY = 1.15
FULL_TRIALS = 3  # the epochs per trial are set so that this many full-length trials fit, when the budget allows
# ... unless each would get fewer epochs than this: then one trial may use the whole search time. Measured
# (benchmarks/quality.py, 2-minute budgets, 1 thread): 1-epoch trials reached 0.57-0.59 val on digits where one
# 4-6 epoch fine-tune reached 0.94-0.96; 3-epoch trials lost 10 points to one 6-epoch fine-tune on glyphs.
MIN_USEFUL_EPOCHS = 3
# The wrap-up besides evaluation (load the best model, write trials.csv, build the report's figures and
# fANOVA importances): measured 5.1 s for a 7-trial study on 2 CPU cores at load ~10 (1.2 s test score and
# model load, 3.9 s report); a load of 17 roughly doubles it. Plus a slack of 3% of the budget for jitter.
WRAP_UP_FIXED_SECONDS = 8.0
SLACK = 0.03
HYPERBAND_FROM_EPOCHS = 9  # rungs at 1, 3, 9 epochs need trials at least this long to cut anything


@dataclass(frozen=True)
class BudgetPlan:
    """How ``--timeout`` is spent: what is gone (preparation, probe), what the wrap-up keeps, and the fidelity
    that fits the rest (epochs per trial, pruner, expected trials). All times in seconds.
    """

    timeout: float
    spent: float
    wrap_up: float
    search: float
    epoch_seconds: float
    max_epochs: int
    pruner: str
    expected_trials: int

    @property
    def launch_window(self) -> float:
        """Seconds from the plan on in which a new trial may start: one epoch must still fit after it."""
        return max(0.0, self.search - self.epoch_seconds)


def plan_budget(
    timeout: float,
    measured: Probe,
    profile: DataProfile,
    *,
    spent: float,
    max_epochs: int,
    pruner: str,
    soup_models: int = 0,
    refit: bool = False,
) -> BudgetPlan:
    """Fit the search to ``timeout`` seconds, of which ``spent`` are gone.

    wrap_up = WRAP_UP_FIXED_SECONDS + 3 x eval cost of (val + test) + SLACK x timeout, plus the final model's
    cost: a soup of up to ``soup_models`` kept models evaluates val ``soup_models + 1`` times; ``refit`` trains
    once more for max_epochs epochs on train+val (so max_epochs is chosen with that refit reserved too);
    search = timeout - spent - wrap_up; epoch = EPOCH_SAFETY x measured full fine-tuning epoch;
    max_epochs = clamp(search / (FULL_TRIALS x epoch), 1, --max-epochs) when that is at least MIN_USEFUL_EPOCHS,
    else clamp(search / epoch, 1, --max-epochs): then one trial may take the whole search time;
    expected trials = search / (epoch x (max_epochs + 1.5) / 2)  (about half run to the end, half are pruned
    after 1-2 epochs). The default median pruner becomes hyperband when trials may run HYPERBAND_FROM_EPOCHS+.

    >>> plan_budget(600, measured, profile, spent=20, max_epochs=10, pruner="median").max_epochs  # doctest: +SKIP
    10
    """
    evaluations = 3 * measured.eval_seconds_per_image * (profile.val + profile.test)  # test score + the report's
    if soup_models >= 2:
        evaluations += (soup_models + 1) * measured.eval_seconds_per_image * profile.val
    wrap_up = WRAP_UP_FIXED_SECONDS + evaluations + SLACK * timeout
    epoch = EPOCH_SAFETY * max(measured.epoch_seconds_full, measured.epoch_seconds_head, 1e-3)
    if refit:  # the refit's epochs cost (train + val) / train of a search epoch; reserve them for the longest trial
        refit_epoch = epoch * (profile.train + profile.val) / max(profile.train, 1)
        room = timeout - spent - wrap_up
        epochs_fit = max(1, min(max_epochs, int(room // (FULL_TRIALS * epoch + refit_epoch))))
        wrap_up += epochs_fit * refit_epoch
    search = timeout - spent - wrap_up
    if search < epoch:
        need = math.ceil(spent + wrap_up + FULL_TRIALS * epoch)
        raise AutoftError(
            f"--timeout {timeout:g}s is too short: preparing and probing took {spent:.0f}s, the final test score "
            f"and report need about {wrap_up:.0f}s, and one epoch about {epoch:.0f}s; give at least --timeout {need}s."
        )
    fits = int(search // epoch)  # epochs of full fine-tuning the search time holds in all
    # Three useful trials fit: share the time. Otherwise one trial takes it all (the portfolio's first
    # fine-tune, like the untuned recipe would): short trials of a small budget learn too little to compare.
    epochs = fits // FULL_TRIALS if fits >= FULL_TRIALS * MIN_USEFUL_EPOCHS else fits
    epochs = max(1, min(max_epochs, epochs))
    if refit:  # the refit reserved above trains as long as the longest trial: no longer trials than it covers
        epochs = min(epochs, epochs_fit)
    chosen = "hyperband" if pruner == "median" and epochs >= HYPERBAND_FROM_EPOCHS else pruner
    return BudgetPlan(
        timeout=timeout,
        spent=spent,
        wrap_up=wrap_up,
        search=search,
        epoch_seconds=epoch,
        max_epochs=epochs,
        pruner=chosen,
        expected_trials=max(1, int(search // (epoch * (epochs + 1.5) / 2))),
    )


# -------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Everything measured and decided before the first trial; ``describe()`` is what ``--explain`` prints."""

    data: DataProfile
    probe: Probe
    priors: tuple[Prior, ...] = ()
    skipped: tuple[str, ...] = ()
    budget: BudgetPlan | None = None
    priors_off: str = ""  # why no prior applies ("--no-priors", "your own space file", ...)
    reused: bool = False  # the probe came from the study (a resumed search)

    def record(self) -> dict[str, Any]:
        """Plain data for the study's user attr ``plan``: the measurements (a resumed search reuses them), the
        priors that fired and the budget plan of the latest run."""
        return {
            "data": dataclasses.asdict(self.data),
            "probe": dataclasses.asdict(self.probe),
            "priors": [prior.name for prior in self.priors],
            "budget": dataclasses.asdict(self.budget) if self.budget is not None else None,
        }

    def describe(self) -> str:
        """The plan in plain lines: the data, the probe, each prior with its reason, the budget."""
        d, p = self.data, self.probe
        lines = [
            f"data: {d.train} train / {d.val} val / {d.test} test images, {d.classes} classes "
            f"({d.smallest_class}-{d.largest_class} per class, imbalance {d.imbalance:.1f}x), {d.image_size} px",
            f"probe{' (stored, from the first run)' if self.reused else ''}: linear probe val accuracy "
            f"{p.linear_probe_accuracy:.3f} (chance {p.chance:.3f}, fit {p.fit:.2f}); one epoch: full fine-tuning "
            f"~{p.epoch_seconds_full:.1f}s, head only ~{p.epoch_seconds_head:.2f}s; probe took {p.seconds:.1f}s",
        ]
        if self.priors_off:
            lines.append(f"priors: off ({self.priors_off})")
        elif not self.priors:
            lines.append("priors: none apply (no threshold crossed); the space is searched as given")
        for prior in self.priors:
            edits = ", ".join(f"{k} {_edit_text(v)}" for k, v in prior.edits.items())
            lines.append(f"prior {prior.name} ({prior.because}): {edits} -- {prior.reason}")
        lines += [f"  skipped: {note}" for note in self.skipped]
        b = self.budget
        if b is None:
            lines.append("budget: none (no --timeout): --trials and --max-epochs as given")
        else:
            lines.append(
                f"budget: {b.timeout:.0f}s = {b.spent:.1f}s spent (preparation, probe) + {b.search:.1f}s search + "
                f"{b.wrap_up:.1f}s wrap-up (test score, report); epoch ~{b.epoch_seconds:.1f}s "
                f"(x{EPOCH_SAFETY} margin) -> up to {b.max_epochs} epoch(s) per trial, pruner {b.pruner}, "
                f"about {b.expected_trials} trials; no trial starts in the last {b.epoch_seconds:.1f}s"
            )
        return "\n".join(lines)


def _edit_text(edit: Mapping[str, Any]) -> str:
    if "choices" in edit:
        return "in {" + ", ".join(map(str, edit["choices"])) + "}"
    return " ".join(f"{'<=' if k == 'high' else '>='} {v:g}" for k, v in edit.items())


def _longest_trial(space: Space) -> int:
    """The most epochs the space lets a trial train (a large number when a function decides)."""
    epochs = next((p for p in getattr(space, "params", ()) if p.name == "epochs"), None)
    if epochs is None:
        return 10**6 if not isinstance(space, SearchSpace) else Recipe.__dataclass_fields__["epochs"].default
    return int(epochs.value if epochs.kind == "fixed" else epochs.high if epochs.kind == "int" else 10**6)


def stored(attrs: Mapping[str, Any]) -> tuple[DataProfile, Probe] | None:
    """The profile and probe a previous run of this study recorded (None for a new study)."""
    record = attrs.get("plan")
    if not isinstance(record, dict):
        return None
    try:
        return DataProfile(**record["data"]), Probe(**record["probe"])
    except (KeyError, TypeError):  # written by another version: measure again
        return None


def make_plan(
    setup: Any,
    space: Space,
    study_attrs: Mapping[str, Any],
    *,
    seed: int,
    timeout: float | None,
    spent: Any,
    max_epochs: int,
    pruner: str,
    priors_off: str = "",
    keep: Sequence[str] = (),
    final_model: Mapping[str, Any] | None = None,
) -> tuple[Plan, Space]:
    """Measure (or reuse the stored measurements), choose priors, plan the budget; return the plan and the space.

    ``final_model`` holds :func:`plan_budget`'s ``soup_models`` / ``refit``: the final model's share of the wrap-up.
    ``spent()`` gives the seconds the command has run so far (read after the probe, so the probe counts).
    ``priors_off`` says why priors are off ('' applies them); ``keep`` names the knobs the user set.
    """
    final_model = dict(final_model or {})
    reuse = stored(study_attrs)
    profile, measured = reuse if reuse is not None else (profile_data(setup.dataset), probe(setup, seed=seed))
    priors: tuple[Prior, ...] = ()
    skipped: tuple[str, ...] = ()
    if not priors_off and not isinstance(space, SearchSpace):
        priors_off = "a space(trial) function is searched as written"
    if not priors_off:
        priors = choose_priors(profile, measured)
        space, skipped = apply_priors(space, priors, keep=keep)
    budget = None
    if timeout is not None:
        longest = min(max_epochs, _longest_trial(space))
        budget = plan_budget(
            timeout, measured, profile, spent=spent(), max_epochs=longest, pruner=pruner, **final_model
        )
        space = space.with_max_epochs(budget.max_epochs)
    plan = Plan(profile, measured, priors, skipped, budget, priors_off=priors_off, reused=reuse is not None)
    return plan, space
