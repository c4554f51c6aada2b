"""A fine-tuning recipe: the complete, resolved strategy one trial trains with.

Search spaces produce plain dicts of chosen values; :func:`Recipe.from_params` turns one into a
recipe with defaults for everything the space left out, so the trial loop never guesses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoft import pieces
from autoft.errors import AutoftError

__all__ = [
    "AUGMENT_LEVELS",
    "BASELINE",
    "CONTROLLER_KNOBS",
    "FREEZE_MODES",
    "LORA_MODES",
    "LORA_TARGETS",
    "OPTIMIZERS",
    "PEFT_MODES",
    "SCHEDULES",
    "Recipe",
    "describe_knobs",
    "knob_choices",
    "knob_names",
]

# Parameter-efficient modes choose what trains themselves (autoft.adapters), not by counting block groups.
PEFT_MODES = ("lora", "lora_bias", "bitfit", "norm")
LORA_MODES = ("lora", "lora_bias")
FREEZE_MODES = ("linear_probe", "partial", "full", "lp_ft", *PEFT_MODES)
LORA_TARGETS = ("attention", "attention+mlp")  # which layers LoRA adapts (autoft.adapters.lora_targets)
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
AUGMENT_LEVELS = ("none", "light", "strong")  # what a task does for each is its own (images: tasks/image/data.py)
# Searched by the controller rather than the recipe: the model (`--model a,b`). A trial's knobs may hold them;
# the recipe ignores them.
CONTROLLER_KNOBS = ("model",)


@dataclass(frozen=True)
class Recipe:
    """How to fine-tune: what trains, with which optimizer and schedule, for how long, on what augmentation.

    >>> Recipe.from_params({"freeze": "partial", "train_blocks": 2, "lr": 3e-4}).describe()
    'last 2 block groups, adamw lr 3e-04, head lr x10, 10 epochs, cosine, augment light'
    """

    freeze: str = "full"
    train_blocks: int = 2  # partial: how many of the last block groups train (with the head)
    lp_epochs: int = 1  # lp_ft: epochs of head-only training before everything unfreezes
    freeze_bn_stats: bool = False
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    head_lr_ratio: float = 10.0
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    epochs: int = 10
    # 0: an epoch is one pass over the train split. N > 0: an epoch is N examples (a round of ceil(N / batch)
    # optimizer steps, drawn from successive shuffled passes), each followed by validation as a pass is. The budget
    # sets it when a pass does not fit a useful trial (issue 14: a 30 s budget, MiniLM on 2,000 tweets in 3 min).
    epoch_examples: int = 0
    warmup_epochs: int = 0
    schedule: str = "cosine"
    batch_size: int = 64
    label_smoothing: float = 0.0
    augment: str = "light"
    lora_rank: int = 8  # lora, lora_bias: rank r of the update B @ A
    lora_alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_targets: str = "attention"  # attention, or attention+mlp (a model without either: its convolutions)
    lora_modules: str = ""  # comma-separated module names (suffixes) to adapt instead of lora_targets
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of image pairs; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) pasted boxes; with mixup on too, one of the two per batch
    extra: Mapping[str, Any] = field(default_factory=dict)  # knobs of registered custom pieces

    def __post_init__(self) -> None:
        for name in ("freeze", "optimizer", "schedule", "augment", "lora_targets"):
            value, valid = getattr(self, name), knob_choices(name)
            if value not in valid:
                raise AutoftError(f"Recipe field {name}={value!r} is not known; choose one of: {', '.join(valid)}.")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise AutoftError(
                f"Recipe needs epochs >= 1, batch_size >= 1 and lr > 0, but got "
                f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}."
            )
        # Out-of-range values would otherwise train silently wrong (a negative rate scale ascends the loss).
        for name, value, ok, rule in (
            ("train_blocks", self.train_blocks, self.train_blocks >= 0, ">= 0"),
            ("lp_epochs", self.lp_epochs, self.lp_epochs >= 0, ">= 0"),
            (
                "epoch_examples",
                self.epoch_examples,
                isinstance(self.epoch_examples, int) and self.epoch_examples >= 0,
                "an int >= 0 (0: an epoch is a pass over train)",
            ),
            ("warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0"),
            ("head_lr_ratio", self.head_lr_ratio, self.head_lr_ratio > 0, "> 0"),
            ("layer_decay", self.layer_decay, self.layer_decay > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("momentum", self.momentum, 0 < self.momentum < 1, "in (0, 1) (timm's sgd is Nesterov)"),
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("mixup", self.mixup, self.mixup >= 0, ">= 0"),
            ("cutmix", self.cutmix, self.cutmix >= 0, ">= 0"),
            ("lora_rank", self.lora_rank, isinstance(self.lora_rank, int) and self.lora_rank >= 1, "an int >= 1"),
            ("lora_alpha", self.lora_alpha, self.lora_alpha > 0, "> 0"),
            ("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("lora_modules", self.lora_modules, isinstance(self.lora_modules, str), "a string such as 'qkv,proj'"),
        ):
            if not ok:
                raise AutoftError(f"Recipe field {name}={value!r} is out of range; it must be {rule}.")

    @classmethod
    def epochs_of(cls, params: dict[str, Any]) -> int:
        """The epochs ``params`` ask for, without checking the rest (a bad knob fails the trial where it runs)."""
        return int(params.get("epochs", cls.__dataclass_fields__["epochs"].default))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Recipe:
        """Build a recipe from a space's chosen values; unknown keys are an error, missing ones take defaults.

        Controller knobs (``model``) are not the recipe's: they are left out.
        """
        custom = pieces.knob_defaults()
        params = {k: v for k, v in params.items() if k not in CONTROLLER_KNOBS}
        unknown = sorted(set(params) - set(knob_names()))
        if unknown:
            raise AutoftError(
                f"Search space parameter(s) {', '.join(unknown)} are not fine-tuning knobs; "
                f"known knobs: {', '.join(knob_names())}."
            )
        builtin = {k: v for k, v in params.items() if k not in custom}
        extra = custom | {k: v for k, v in params.items() if k in custom}
        recipe = cls(**builtin, extra=extra)
        # Warmup and the linear-probe phase must leave at least one epoch of the main phase.
        return dataclasses.replace(
            recipe,
            warmup_epochs=min(recipe.warmup_epochs, recipe.epochs - 1),
            lp_epochs=min(recipe.lp_epochs, recipe.epochs - 1),
        )

    def train_blocks_at(self, epoch: int) -> int | None:
        """How many block groups train at ``epoch``: None = all, 0 = head only (linear probe).

        Parameter-efficient modes (and registered freeze pieces) start from all and choose for themselves.
        """
        if self.freeze == "linear_probe":
            return 0
        if self.freeze == "partial":
            return self.train_blocks
        if self.freeze == "lp_ft" and epoch < self.lp_epochs:
            return 0
        return None

    def _lora_words(self) -> str:
        where = self.lora_modules or self.lora_targets
        dropout = f", dropout {self.lora_dropout:.2g}" if self.lora_dropout > 0 else ""
        return f"LoRA r{self.lora_rank} alpha {self.lora_alpha:g} on {where}{dropout}"

    def knob(self, name: str) -> Any:
        """The value of a registered custom piece's knob (its default when the space did not search it)."""
        if name not in self.extra:
            raise AutoftError(f"No custom knob {name!r}; register it with the piece: knobs={{{name!r}: default}}.")
        return self.extra[name]

    def describe(self) -> str:
        """The strategy in plain words, for summaries and reports."""
        what = {
            "linear_probe": "linear probe (head only)",
            "partial": f"last {self.train_blocks} block groups",
            "full": "full fine-tune",
            "lp_ft": f"LP-FT ({self.lp_epochs} head-only epochs, then all)",
            "lora": self._lora_words(),
            "lora_bias": f"{self._lora_words()} + biases",
            "bitfit": "BitFit (biases + head)",
            "norm": "norm layers + head",
        }.get(self.freeze, f"custom freeze {self.freeze}")
        parts = [what, f"{self.optimizer} lr {self.lr:.0e}"]
        if self.freeze != "linear_probe":
            parts.append(f"head lr x{self.head_lr_ratio:.3g}")
            if self.layer_decay < 1.0:
                parts.append(f"layer decay {self.layer_decay:.2f}")
        parts.append(f"{self.epochs} epochs" + (f" of {self.epoch_examples} examples" * bool(self.epoch_examples)))
        parts.append(self.schedule)
        if self.label_smoothing > 0:
            parts.append(f"label smoothing {self.label_smoothing:.2f}")
        parts.append(f"augment {self.augment}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) > 0:
                parts.append(f"{name} {getattr(self, name):.2g}")
        parts += [f"{k} {v}" for k, v in sorted(self.extra.items())]
        return ", ".join(parts)


def describe_knobs(params: Mapping[str, Any]) -> str:
    """A trial's strategy in plain words, led by its model when the model was searched.

    >>> describe_knobs({"model": "resnet50", "freeze": "linear_probe", "epochs": 3, "augment": "none"})
    'resnet50: linear probe (head only), adamw lr 1e-03, 3 epochs, cosine, augment none'
    """
    strategy = Recipe.from_params(dict(params)).describe()
    return f"{params['model']}: {strategy}" if "model" in params else strategy


def knob_names() -> list[str]:
    """Every knob a search space may set: the recipe's fields and the registered custom pieces' knobs."""
    builtin = [f.name for f in dataclasses.fields(Recipe) if f.name != "extra"]
    return builtin + sorted(set(pieces.knob_defaults()) - set(builtin))


def knob_choices(name: str) -> tuple[Any, ...] | None:
    """The values a knob with a fixed vocabulary may take (custom pieces included); None for numeric knobs."""
    vocab = {
        "freeze": FREEZE_MODES + pieces.names("freeze"),
        "optimizer": OPTIMIZERS + pieces.names("optimizer"),
        "schedule": SCHEDULES,
        "augment": AUGMENT_LEVELS,
        "lora_targets": LORA_TARGETS,
    }
    return vocab.get(name)


# The untuned default recipe people reach for first: one full fine-tune with Adam at lr 1e-3.
BASELINE = Recipe(freeze="full", optimizer="adam", lr=1e-3, head_lr_ratio=1.0, weight_decay=0.0, augment="light")
