"""Look before searching, part one: what the data looks like and what the pretrained features already do.

:func:`profile_data` counts examples per split and class (nothing is trained). :func:`probe` measures only what a
decision uses: a linear probe on the pooled pretrained features of a bounded, class-covering sample (for the priors)
and the cost of one epoch (for a ``--timeout`` budget): full fine-tuning and each other freeze mode family the space
offers (partial, LoRA, BitFit, norm), head-only training and evaluation, timed by :mod:`autoft.step_cost`.
Everything goes through the setup's task, so any task is probed the same way.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoft import features, step_cost
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.step_cost import ModeCost, cost_family
from autoft.tasks.base import Dataset, TensorSplit

__all__ = [
    "PROBE_TRAIN_EXAMPLES",
    "PROBE_VAL_EXAMPLES",
    "DataProfile",
    "ModeCost",
    "Probe",
    "cost_family",
    "probe",
    "profile_data",
    "sample_rows",
]

log = logging.getLogger(__name__)


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

    ``linear_probe_accuracy``: val accuracy of a logistic-regression head on the frozen pooled features of an evenly
    spread, class-covering sample (None: not measured, no prior needs it); ``chance``: the accuracy of always
    guessing the most common val class; ``epoch_seconds_full``: one epoch of full fine-tuning over the train split
    plus the val evaluation; ``epoch_seconds_head``: one head-only epoch without the feature cache (a frozen forward
    pass over train, plus the val evaluation: an upper bound); ``eval_seconds_per_image``: inference cost (the three
    costs are None when not measured: only a ``--timeout`` budget needs them); ``seconds``: what the probe took;
    ``examples``: the train + val examples the linear probe saw; ``modes``: the step cost of full fine-tuning and
    of each other freeze mode family the space offers (:class:`ModeCost`; ``--timeout`` only).
    """

    linear_probe_accuracy: float | None
    chance: float
    epoch_seconds_full: float | None
    epoch_seconds_head: float | None
    eval_seconds_per_image: float | None
    seconds: float
    examples: int = 0
    modes: tuple[ModeCost, ...] = ()

    def __post_init__(self) -> None:  # a stored probe (the study's JSON) holds its mode costs as plain mappings
        costs = tuple(c if isinstance(c, ModeCost) else ModeCost(**c) for c in self.modes)
        object.__setattr__(self, "modes", costs)

    def mode(self, family: str) -> ModeCost | None:
        """The measured cost of a freeze mode family (:func:`cost_family`), None when not measured."""
        return next((c for c in self.modes if c.mode == family), None)

    def epoch_seconds(self, freeze: str) -> float | None:
        """One epoch of a trial with freeze mode ``freeze``; an unmeasured family counts as full fine-tuning."""
        family = cost_family(freeze)
        if family == "head":
            return self.epoch_seconds_head
        measured = self.mode(family)
        return measured.epoch_seconds if measured is not None else self.epoch_seconds_full

    @property
    def fit(self) -> float | None:
        """The probe's accuracy above chance, as a share of the room above chance (0 = chance, 1 = perfect)."""
        if self.linear_probe_accuracy is None:
            return None
        return (self.linear_probe_accuracy - self.chance) / max(1e-9, 1.0 - self.chance)

    @property
    def has_linear_probe(self) -> bool:
        return self.linear_probe_accuracy is not None

    @property
    def has_costs(self) -> bool:
        return self.epoch_seconds_full is not None and self.eval_seconds_per_image is not None


# The linear probe sees at most this many train and val examples, evenly spread over each class: its cost is
# bounded whatever the data size. Measured on digits (benchmarks/probe_sample.py, docs/benchmarks.md): the fit on
# 1,017 of the 1,077 train images was 0.864-0.873 against 0.873-0.879 on all of them; on 505 it fell to 0.80-0.81
# (a linear probe learns from more examples; the prior's threshold was set on fits of whole data sets).
PROBE_TRAIN_EXAMPLES, PROBE_VAL_EXAMPLES = 1024, 512
# A first sample of at most this many train and val examples (a part of the whole sample) decides alone when its
# fit already settles the prior (the caller's ``settled``: far below the threshold, whatever the bias of a small
# sample): the rest is computed only near the threshold. On 2,001 tweets with MiniLM-L6 the whole sample's pooled
# pass took ~15 s of a 180 s budget for a fit of 0.47, where the prior needs 0.95.
FIRST_TRAIN_EXAMPLES, FIRST_VAL_EXAMPLES = 256, 128

# The sample is copied out of its split this many examples at a time (features.pooled's batch size).
SAMPLE_CHUNK = 256


def probe(
    setup: Setup,
    *,
    seed: int = 0,
    linear_probe: bool = True,
    costs: bool = True,
    previous: Probe | None = None,
    steps: int = 100,
    modes: Sequence[Recipe] = (),
    settled: Callable[[float], bool] | None = None,
    affordable: Callable[[float], bool] | None = None,
) -> Probe:
    """Measure what the plan needs, for one prepared model (a ``Setup``): the linear probe (``linear_probe``: for the
    priors) and the epoch costs (``costs``: for a ``--timeout`` budget); what ``previous`` (a resumed study's stored
    probe) already holds is kept, not measured again.

    The linear probe trains a fresh linear layer on standardized pooled features of a sample (:func:`sample_rows`,
    at most PROBE_TRAIN_EXAMPLES / PROBE_VAL_EXAMPLES) for ``steps`` mini-batch steps of Adam; when ``settled(fit)``
    holds for the fit on the first FIRST_TRAIN_EXAMPLES / FIRST_VAL_EXAMPLES of it, that fit is kept and the rest
    is not computed; so it is when ``affordable(seconds)`` is false for the rest's pooled pass, predicted from the
    first part's pace (a short budget: the look before searching stays a small share of it). The feature cache is
    not built here (a head-only trial builds it when it first needs it, inside that trial). The epoch cost is
    extrapolated per example from the fastest of a few small timed steps (:func:`autoft.step_cost.mode_cost`): of
    full fine-tuning, and of one recipe per other freeze mode family among ``modes`` (the space's most expensive of
    each family; one timing per family, :func:`cost_family`). ``affordable`` also decides the optional timings
    there (the evaluation's, the trials' batch's steps).

    >>> result = probe(prepare(config))  # doctest: +SKIP
    >>> result.linear_probe_accuracy, result.epoch_seconds_full  # doctest: +SKIP
    (0.91, 12.4)
    """
    started = time.perf_counter()
    dataset = setup.dataset
    counts = class_counts(dataset.val.labels, len(dataset.classes))
    chance = counts.max().item() / max(1, int(counts.sum()))
    kept = previous or Probe(None, chance, None, None, None, seconds=0.0)
    wanted = {cost_family(r.freeze): r for r in (Recipe(), *modes) if cost_family(r.freeze) != "head"}
    missing = [r for family, r in wanted.items() if kept.mode(family) is None] if costs else []
    if (not linear_probe or kept.has_linear_probe) and not missing and previous is not None:
        return previous  # a resumed study: everything needed is stored
    accuracy, examples, eval_per_image = kept.linear_probe_accuracy, kept.examples, kept.eval_seconds_per_image
    if linear_probe and accuracy is None and _has_pooled_features(setup.base_model):
        accuracy, examples, pooled_per_image = _staged_linear_probe(
            setup, chance=chance, seed=seed, steps=steps, settled=settled, affordable=affordable
        )
        eval_per_image = eval_per_image or pooled_per_image  # the same forward pass, less the classifier
    elif linear_probe and accuracy is None:  # no pooled features (per-token outputs): at chance fit is 0, no prior
        accuracy = chance
    full, head, mode_costs = kept.epoch_seconds_full, kept.epoch_seconds_head, kept.modes
    if missing:  # the budget's evaluations, timed as they run: batches of 64 (the pooled pass above: 256, start-up in)
        eval_per_image = kept.eval_seconds_per_image or step_cost.timed_eval(setup, eval_per_image, affordable)
        val_seconds = eval_per_image * len(dataset.val)
        mode_costs += tuple(
            step_cost.mode_cost(setup, r, val_seconds=val_seconds, affordable=affordable) for r in missing
        )
        full = next(c.epoch_seconds for c in mode_costs if c.mode == "full")
        head = eval_per_image * len(dataset.train) + val_seconds
    return Probe(
        linear_probe_accuracy=accuracy,
        chance=chance,
        epoch_seconds_full=full,
        epoch_seconds_head=head,
        eval_seconds_per_image=eval_per_image,
        seconds=kept.seconds + time.perf_counter() - started,
        examples=examples,
        modes=mode_costs,
    )


def _has_pooled_features(model: nn.Module) -> bool:
    return all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head"))


def sample_rows(labels: torch.Tensor, limit: int, classes: int) -> torch.Tensor:
    """At most ``limit`` rows of a split, every class with examples among them (when ``classes <= limit``), each
    class's share about its share of the split, its rows evenly spread over the class (a folder read in order
    gives every part of it). All rows when the split has at most ``limit``; per-token labels: evenly spread rows.

    >>> sample_rows(torch.tensor([0] * 90 + [1] * 10), 10, 2).tolist()
    [0, 13, 25, 38, 51, 64, 76, 89, 90]
    """
    if len(labels) <= limit:
        return torch.arange(len(labels))
    if labels.dim() != 1 or classes > limit:
        return torch.linspace(0, len(labels) - 1, limit).round().long()
    counts = class_counts(labels, classes)
    present = int((counts > 0).sum())
    rows = []
    for label in counts.nonzero().flatten().tolist():
        members = (labels == label).nonzero().flatten()
        # One each first, then the room left shared by class size: the total never passes `limit`.
        share = min(len(members), 1 + (limit - present) * len(members) // len(labels))
        rows.append(members[torch.linspace(0, len(members) - 1, share).round().long()])
    return torch.cat(rows).sort().values


def _staged_linear_probe(
    setup: Setup,
    *,
    chance: float,
    seed: int,
    steps: int,
    settled: Callable[[float], bool] | None,
    affordable: Callable[[float], bool] | None = None,
) -> tuple[float, int, float | None]:
    """The linear probe's val accuracy, the examples it saw and the seconds per example of its pooled pass (None
    when nothing was computed): on the first part of the sample (:func:`sample_rows` of the whole sample), kept
    when ``settled`` holds for its fit or when ``affordable`` refuses the rest's predicted seconds; else on the
    whole sample, the first part's features reused.

    The features come from the feature cache when something already built it (model selection's linear probe);
    otherwise they are computed here on an eval-mode copy of the model (dropout off, as in the cache) and handed to
    the cache (:meth:`~autoft.features.FeatureCache.adopt`): when a head-only trial builds it, only the rows
    outside the sample are computed, so the probe's forward pass is not paid twice.
    """
    dataset, classes = setup.dataset, len(setup.dataset.classes)
    splits = {"train": dataset.train, "val": dataset.val}
    limits = {"train": (PROBE_TRAIN_EXAMPLES, FIRST_TRAIN_EXAMPLES), "val": (PROBE_VAL_EXAMPLES, FIRST_VAL_EXAMPLES)}
    whole = {name: sample_rows(split.labels, limits[name][0], classes) for name, split in splits.items()}
    first = {
        name: rows[sample_rows(splits[name].labels[rows], limits[name][1], classes)] for name, rows in whole.items()
    }
    rest = {name: rows[~torch.isin(rows, first[name])] for name, rows in whole.items()}
    cached = setup.feature_cache.built() if setup.feature_cache is not None else None
    if cached is not None:  # already built: read, not computed (and nothing to adopt)
        built = dict(zip(splits, cached, strict=True))
        sample = {name: TensorSplit(built[name].images[rows], built[name].labels[rows]) for name, rows in whole.items()}
        accuracy = _linear_probe(sample["train"], sample["val"], classes, seed=seed, steps=steps)
        return accuracy, sum(map(len, whole.values())), None
    model = copy.deepcopy(setup.base_model).to(setup.device).eval()
    started = time.perf_counter()
    rows = dict(first)
    pooled = {name: _pooled_rows(setup, model, splits[name], first[name]) for name in splits}
    accuracy = _linear_probe(*_labelled(setup, splits, rows, pooled), classes, seed=seed, steps=steps)
    fit = (accuracy - chance) / max(1e-9, 1.0 - chance)
    more = any(len(r) for r in rest.values()) and not (settled is not None and settled(fit))
    if more and affordable is not None:  # the rest's pooled pass, at the first part's pace (its start-up in)
        step_cost.sync(setup.device)
        pace = (time.perf_counter() - started) / max(1, sum(map(len, first.values())))
        rest_seconds = pace * sum(map(len, rest.values()))
        more = affordable(rest_seconds)
        if not more:
            log.info("linear probe: fit %.2f kept on the first sample (the rest would take ~%.1fs)", fit, rest_seconds)
    if more:
        for name, extra in ((name, extra) for name, extra in rest.items() if len(extra)):
            pooled[name] = torch.cat([pooled[name], _pooled_rows(setup, model, splits[name], extra)])
            rows[name] = torch.cat([rows[name], extra])
        accuracy = _linear_probe(*_labelled(setup, splits, rows, pooled), classes, seed=seed, steps=steps)
    step_cost.sync(setup.device)
    seen = sum(map(len, rows.values()))
    per_example = (time.perf_counter() - started) / max(1, seen)  # the first batch's start-up in: a little above
    cache = setup.feature_cache
    if cache is not None and cache.base_model is setup.base_model:  # a head-only trial's cache computes the rest
        for name in splits:
            cache.adopt(name, rows[name], pooled[name])
    return accuracy, seen, per_example


def _pooled_rows(setup: Setup, model: nn.Module, split: object, rows: torch.Tensor) -> torch.Tensor:
    """Pooled features of ``rows`` of ``split``, a chunk at a time: a mapped split past the memory bound is never
    copied whole (1,536 images at 224 px are 231 MB), and the batches are the same as over the whole sample."""
    return torch.cat([
        features.pooled(model, setup.task, setup.task.select(split, chunk), setup.spec, device=setup.device)
        for chunk in rows.split(SAMPLE_CHUNK)
    ])  # fmt: skip


def _labelled(
    setup: Setup, splits: dict, rows: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor]
) -> tuple[TensorSplit, TensorSplit]:
    """The linear probe's train and val: float features with their rows' labels."""
    train, val = (TensorSplit(pooled[n].float(), splits[n].labels[rows[n]].to(setup.device)) for n in ("train", "val"))
    return train, val


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
