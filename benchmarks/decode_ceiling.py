"""How much of 2 x the single-core decode rate this machine gives at all (issue 17's decode target).

One plain loop of autoft's per-image decode (``decode._decode``, 256 px JPEG -> 224 px) alone, then two such loops
at once in two separate processes (no GIL, nothing shared but the machine): if each of the two runs slower than
the one alone, the ceiling is the machine's (shared caches, memory bandwidth, the host's scheduling of its vCPUs),
and no thread or process pool can pass it. ``--repeats`` alternating rounds; the best round of each side counts.

    .venv/bin/python benchmarks/decode_ceiling.py [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from decode_speed import write_jpegs
from PIL import Image

from autoft.tasks.image import decode


def loop(paths: list[Path]) -> float:
    """Images per second of one plain decode loop over ``paths``."""
    started = time.perf_counter()
    for path in paths:
        decode._decode(path, 224, Image.Resampling.BICUBIC)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("demo_data/bench/jpegs"), help="where the JPEGs go")
    args = parser.parse_args()
    paths = write_jpegs(args.data / f"256px-{max(2000, args.images)}", count=max(2000, args.images), size=256)
    paths = paths[: args.images]
    alone, pairs = [], []
    with mp.get_context("spawn").Pool(2) as pool:
        for _ in range(args.repeats):
            alone.append(loop(paths))
            pairs.append(pool.map(loop, [paths, paths]))
    best_alone, best_pair = max(alone), max(sum(pair) for pair in pairs)
    print(json.dumps({
        "images": args.images, "alone_images_per_s": [round(r, 1) for r in alone],
        "each_of_two_images_per_s": [[round(r, 1) for r in pair] for pair in pairs],
        "two_processes_vs_2x_alone": round(best_pair / (2 * best_alone), 3), "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
