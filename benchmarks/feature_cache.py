"""Wall time of a linear-probe trial with vs without the frozen-feature cache, and of a last-2-blocks trial
with vs without the frozen-prefix cache.

Side by side in one process, on the demo's model and data. Each cached side is timed twice: the first trial
includes building the cache (one forward pass over train + val), the later one is every later trial of the
search (the caches are shared through the Setup). The last-2-blocks sides alternate (without, with, without,
with, ...) ``--repeats`` times and each side's fastest run counts, so load on a shared machine hits both alike.
Prints one line of JSON.

    .venv/bin/python benchmarks/feature_cache.py [--epochs 10] [--partial-epochs 3] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from _common import MODEL, machine, setup

from autoft.features import FeatureCache
from autoft.prefix import PrefixCache
from autoft.recipe import Recipe
from autoft.trial import run_trial


def timed(
    s, recipe: Recipe, cache: FeatureCache | None = None, prefix: PrefixCache | None = None
) -> tuple[float, float]:
    """Seconds of one trial, and its best val accuracy."""
    started = time.perf_counter()
    outcome = run_trial(dataclasses.replace(s, feature_cache=cache, prefix_cache=prefix), recipe, seed=0)
    return time.perf_counter() - started, outcome.best_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--partial-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating last-2-blocks runs per side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--image-size", type=int, default=48, help="pixels (the demo's 48; the frozen prefix's share grows with it)"
    )
    args = parser.parse_args()
    s = setup(args.device, args.image_size)
    probe = Recipe(freeze="linear_probe", lr=1e-2, epochs=args.epochs, batch_size=64, augment="none")
    fresh = FeatureCache(s.base_model, s.dataset, s.task, s.spec, device=s.device)
    uncached, acc_uncached = timed(s, probe, None)
    first, acc_first = timed(s, probe, fresh)
    later, acc_later = timed(s, probe, fresh)
    partial = Recipe(freeze="partial", train_blocks=2, lr=1e-3, epochs=args.partial_epochs, augment="none")
    prefix = PrefixCache(s.base_model, s.dataset, s.task, s.spec, device=s.device)
    plain_runs, plain_acc = [], 0.0
    partial_first, first_acc = timed(s, partial, prefix=prefix)  # builds the prefix cache
    cached_runs, cached_acc = [], 0.0
    for _ in range(args.repeats):
        seconds, plain_acc = timed(s, partial)
        plain_runs.append(seconds)
        seconds, cached_acc = timed(s, partial, prefix=prefix)
        cached_runs.append(seconds)
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
        "last_2_blocks_s": {
            "without_cache": [round(x, 2) for x in plain_runs],
            "with_cache": [round(x, 2) for x in cached_runs],
            "with_cache_first_trial": round(partial_first, 2),
        },
        "last_2_blocks_ratio": round(min(plain_runs) / min(cached_runs), 2),
        "last_2_blocks_ratio_first_trial": round(min(plain_runs) / partial_first, 2),
        "last_2_blocks_target": ">= 1.5",
        "last_2_blocks_val_accuracy": {"uncached": plain_acc, "cached": cached_acc, "cached_first": first_acc},
        "prefix_cache_mib": round(prefix.bytes_in("memory") / 2**20, 2),
        "machine": machine(s.device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
