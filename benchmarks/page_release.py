"""What releasing a mapped split's pages costs the data path (issue 17, ``autoft.tasks.pages``).

A ``--images``-row uint8 file of 224 px images (1.2 GB at 8,000), mapped as the cache maps it, read once per
round in shuffled batches of 64 through ``base.batches`` (the gather a trial's data path does), with the default
``pages.WINDOW`` (the pages dropped every 128 MiB the mapping may have mapped) and with releases off. Images/s of
the data path alone (no model) and the peak RssFile of this process, ``--repeats`` alternating rounds.

    .venv/bin/python benchmarks/page_release.py [--images 8000] [--repeats 2] [--csv FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import write_csv

from autoft.tasks import pages
from autoft.tasks.base import MappedSplit, batches


def _rss_file_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) // 1024
    return 0


def one_round(split: MappedSplit, window: int, seed: int) -> dict:
    pages.WINDOW, peak, seen = window, 0, 0
    started = time.perf_counter()
    for _, labels in batches(split, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)):
        seen += len(labels)
        peak = max(peak, _rss_file_mib())
    return {"images_per_s": round(seen / (time.perf_counter() - started)), "peak_rss_file_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    default, rows = pages.WINDOW, []
    with tempfile.TemporaryDirectory(prefix="autoft-page-release-") as folder:
        path = Path(folder, "split.images.npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.images, 3, 224, 224))
        for start in range(0, args.images, 500):  # some content, written a slice at a time
            out[start : start + 500] = np.random.default_rng(start).integers(0, 256, (1, 3, 224, 224), np.uint8)
        out.flush()
        del out
        split = MappedSplit(pages.mapped(path), torch.arange(args.images), path)
        for repeat in range(args.repeats):
            for name, window in (("releases", default), ("no releases", 2**62)):
                rows.append({"side": name, "repeat": repeat} | one_round(split, window, repeat))
    pages.WINDOW = default
    print(json.dumps({"images": args.images, "rows": rows, "date": time.strftime("%Y-%m-%d")}))
    if args.csv is not None:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
