"""Wall time of a linear-probe trial with vs without the frozen-feature cache, and of a last-2-blocks trial.

Side by side in one process, on the demo's model and data. The linear probe is timed twice with the cache:
``cached_first_trial_s`` includes building the cache (one forward pass over train + val), ``cached_trial_s``
is every later trial of the search (the cache is shared through the Setup). There is no prefix cache for
partial freezing, so the last-2-blocks trial runs the same path either way; its ratio is reported as measured.
Prints one line of JSON.

    .venv/bin/python benchmarks/feature_cache.py [--epochs 10] [--partial-epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import MODEL, machine, setup

from autoft.features import FeatureCache
from autoft.recipe import Recipe
from autoft.trial import run_trial


def timed(s, recipe: Recipe, cache: FeatureCache | None) -> tuple[float, float]:
    """Seconds of one trial, and its best val accuracy."""
    started = time.perf_counter()
    outcome = run_trial(
        s.base_model, recipe, s.dataset, mean=s.mean, std=s.std, device=s.device, seed=0,
        report=lambda epoch, metrics: False, feature_cache=cache,
    )  # fmt: skip
    return time.perf_counter() - started, outcome.best_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--partial-epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    s = setup(args.device)
    probe = Recipe(freeze="linear_probe", lr=1e-2, epochs=args.epochs, batch_size=64, augment="none")
    fresh = FeatureCache(s.base_model, s.dataset, mean=s.mean, std=s.std, device=s.device)
    uncached, acc_uncached = timed(s, probe, None)
    first, acc_first = timed(s, probe, fresh)
    later, acc_later = timed(s, probe, fresh)
    partial = Recipe(freeze="partial", train_blocks=2, lr=1e-3, epochs=args.partial_epochs, augment="none")
    partial_plain, _ = timed(s, partial, None)
    partial_cached, _ = timed(s, partial, fresh)
    result = {
        "benchmark": "feature_cache",
        "model": MODEL,
        "image_size": s.dataset.image_size,
        "train_images": len(s.dataset.train),
        "val_images": len(s.dataset.val),
        "linear_probe_epochs": args.epochs,
        "uncached_trial_s": round(uncached, 2),
        "cached_first_trial_s": round(first, 2),
        "cached_trial_s": round(later, 3),
        "ratio": round(uncached / later, 1),
        "ratio_first_trial": round(uncached / first, 1),
        "target": ">= 10",
        "val_accuracy": {"uncached": acc_uncached, "cached": acc_later, "cached_first": acc_first},
        "cache_mib": round(fresh.nbytes / 2**20, 2),
        "last_2_blocks_epochs": args.partial_epochs,
        "last_2_blocks_s": {"without_cache": round(partial_plain, 2), "with_cache": round(partial_cached, 2)},
        "last_2_blocks_ratio": round(partial_plain / partial_cached, 2),
        "last_2_blocks_note": "no prefix cache for partial freezing: both sides run the frozen blocks every epoch",
        "machine": machine(s.device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
