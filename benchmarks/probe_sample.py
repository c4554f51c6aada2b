"""How the linear probe's fit depends on its sample: the probe's bound (probe.PROBE_TRAIN_EXAMPLES / _VAL_) checked.

The demo's data and model (benchmarks/_common.py): pooled features of every train and val image once (the feature
cache), then the linear probe on samples of each size (``probe.sample_rows``: every class, evenly spread), three
seeds each. Prints one JSON line per size: train and val examples, val accuracy and fit per seed.

    python benchmarks/probe_sample.py
"""

from __future__ import annotations

import json

import torch
from _common import setup

from autoft.probe import _linear_probe, sample_rows
from autoft.tasks.base import TensorSplit

SIZES = ((None, None), (1024, 512), (512, 256), (256, 128), (128, 64))


def main() -> None:
    prepared = setup()
    train, val = prepared.feature_cache.splits()
    classes = len(prepared.dataset.classes)
    for train_limit, val_limit in SIZES:
        rows = [
            sample_rows(split.labels, limit or len(split), classes)
            for split, limit in ((train, train_limit), (val, val_limit))
        ]
        sample = [TensorSplit(s.images[r], s.labels[r]) for s, r in zip((train, val), rows, strict=True)]
        chance = torch.bincount(sample[1].labels).max().item() / len(sample[1])
        accuracies = [_linear_probe(*sample, classes, seed=seed, steps=100) for seed in range(3)]
        fits = [(a - chance) / (1 - chance) for a in accuracies]
        line = {"train": len(rows[0]), "val": len(rows[1]), "accuracy": accuracies, "fit": fits}
        print(json.dumps({k: [round(x, 3) for x in v] if isinstance(v, list) else v for k, v in line.items()}))


if __name__ == "__main__":
    main()
