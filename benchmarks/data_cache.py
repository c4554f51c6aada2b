"""The decoded-image cache (issue 17): how much sooner a second search on the same folder starts training.

A generated folder of photo-like JPEGs (``decode_speed.write_jpegs``, ``--images`` in ``--classes`` class folders,
``--size`` px) searched at ``--image-size`` px with a small model (``--model``, random weights: the figures are
times, not accuracy). Each search is stopped the moment its first trial starts; what is timed:

- ``to_first_trial``: from the call to the first trial's start (model, data, probe and plan, study);
- ``data``: the image task's ``load_data`` alone (decode, or map the cache).

Searches, in order, on one cache folder:

1. ``first``: a new cache: decodes every image (straight into the cache file);
2. ``second``: a new run dir, same cache: maps the images, reuses the probe kept beside the entry, plans;
3. ``resumed``: the first search's command again (same run dir): maps the images, reuses the stored plan;
4. ``no_cache``: ``--no-cache`` (decodes into memory), for reference.

Target: the second search starts training >= 20x sooner than the first. Prints one JSON line; ``--csv`` writes the
rows.

    .venv/bin/python benchmarks/data_cache.py [--images 3000] [--model test_resnet] [--image-size 224]
        [--csv benchmarks/results/data-cache.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from _common import write_csv
from decode_speed import write_jpegs

from autoft.config import SearchConfig
from autoft.controller import Progress, run_search
from autoft.tasks.image import ImageTask


class _TrialStarted(BaseException):
    """Raised from the progress callback at the first trial's start: ends the search there (like a Ctrl-C)."""


def write_folder(root: Path, *, images: int, classes: int, size: int) -> Path:
    for k in range(classes):
        write_jpegs(root / f"class{k}", count=images // classes, size=size, seed=k)
    return root


def timed_search(config: SearchConfig) -> dict[str, float]:
    """Seconds to the first trial's start, and of ``load_data`` within them."""
    spent: dict[str, float] = {}
    load_data = ImageTask.load_data

    def timed_load(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return load_data(self, *args, **kwargs)
        finally:
            spent["data"] = spent.get("data", 0.0) + time.perf_counter() - started

    def on_progress(event: Progress) -> None:
        if event.kind == "trial_start":
            raise _TrialStarted

    ImageTask.load_data = timed_load
    started = time.perf_counter()
    try:
        run_search(config, progress=on_progress)
    except _TrialStarted:
        spent["to_first_trial"] = time.perf_counter() - started
    finally:
        ImageTask.load_data = load_data
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="the JPEGs' side in pixels")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--data", type=Path, default=Path("demo_data/bench/cache-folder"))
    parser.add_argument("--csv", type=Path, help="also write one row per search to this CSV file")
    args = parser.parse_args()
    folder = write_folder(args.data / f"{args.size}px-{args.images}", images=args.images, classes=args.classes,
                          size=args.size)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="autoft-data-cache-"))
    cache, load = work / "cache", os.getloadavg()[0]
    common = {"model": args.model, "data": folder, "pretrained": False, "image_size": args.image_size, "trials": 1,
              "max_epochs": 1}  # fmt: skip
    runs = {
        "first": SearchConfig(**common, run_dir=work / "runs" / "a", cache_dir=cache),
        "second": SearchConfig(**common, run_dir=work / "runs" / "b", cache_dir=cache),
        "resumed": SearchConfig(**(common | {"trials": 2}), run_dir=work / "runs" / "a", cache_dir=cache),
        "no_cache": SearchConfig(**common, run_dir=work / "runs" / "c", cache=False),
    }
    try:
        rows = [{"search": name} | {k: round(v, 2) for k, v in timed_search(config).items()}
                for name, config in runs.items()]  # fmt: skip
        disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {row["search"]: row for row in rows}
    result = {
        "images": args.images, "image_size": args.image_size, "model": args.model, "rows": rows,
        "cache_mib": round(disk / 2**20, 1),
        "second_vs_first_to_first_trial": round(by["first"]["to_first_trial"] / by["second"]["to_first_trial"], 1),
        "resumed_vs_first_to_first_trial": round(by["first"]["to_first_trial"] / by["resumed"]["to_first_trial"], 1),
        "second_vs_first_data": round(by["first"]["data"] / by["second"]["data"], 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": os.cpu_count(), "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(result))
    if args.csv is not None:
        load_text = " ".join(map(str, result["load_average"]))
        write_csv(args.csv, [row | {"images": args.images, "load_average": load_text} for row in rows])


if __name__ == "__main__":
    main()
