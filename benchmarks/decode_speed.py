"""Decode throughput (issue 17): autoft's parallel decode against a plain single-threaded PIL loop, images/s.

Generated JPEGs (smooth random scenes: blurred colour fields with shapes and a little grain, like photos compress,
not white noise) of ``--size`` px, decoded to ``--image-size`` px (shorter side resized bicubic, center crop), the
work autoft does for every image. Three sides, alternating ``--repeats`` times so the machine's load hits them alike;
each side's fastest run counts:

- ``plain_pil``: the loop a person writes: ``Image.open(p).convert("RGB")``, resize, crop, ``np.asarray``; one core.
- ``single_core``: autoft's own per-image decode (``decode._decode``) in a plain loop: the single-core rate.
- ``autoft``: ``decode.decode_into`` (its thread pool) into memory, as a search decodes; and ``autoft_mapped``:
  into the cache entry's ``.npy`` file (``cache.RowFile``: rows written with pwrite), as a search with the cache
  decodes.

Target: autoft >= 0.8 x (cores x single-core rate). On a shared machine the wall-clock rates depend on what other
jobs leave; each row also says how many cores its side really used (CPU seconds / wall seconds), and
``ratio_vs_cores_x_single_cpu_rate`` compares autoft's wall-clock rate with ``cores`` x the single-core rate per CPU
second (what one core decodes when it is ours). Prints one JSON line; ``--csv`` also writes the rows.

    .venv/bin/python benchmarks/decode_speed.py [--images 2000] [--size 256] [--image-size 224] [--repeats 3]
        [--csv benchmarks/results/decode-speed.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import write_csv
from PIL import Image, ImageDraw, ImageFilter

from autoft.tasks.image import cache, decode

BICUBIC = Image.Resampling.BICUBIC


def write_jpegs(root: Path, *, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs of ``size`` px under ``root`` (reused when already complete)."""
    marker = root / f".complete-{count}-{size}"
    paths = [root / f"{i:05d}.jpg" for i in range(count)]
    if marker.is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in paths:
        field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # a few colour regions, upsampled smooth
        img = Image.fromarray(field).resize((size, size), BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16, size // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        grain = rng.integers(-6, 7, (size, size, 3))
        pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    marker.write_text("")
    return paths


def plain_pil(paths: list[Path], size: int) -> None:
    """The single-threaded loop a person writes."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        out[i] = np.asarray(img.crop((left, top, left + size, top + size)))


def single_core(paths: list[Path], size: int) -> None:
    """autoft's per-image work, one image after another."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode._decode(path, size, BICUBIC).transpose(2, 0, 1)


def autoft_memory(paths: list[Path], size: int) -> None:
    decode.decode_into(list(paths), np.empty((len(paths), 3, size, size), dtype=np.uint8), size, BICUBIC)


def autoft_mapped(paths: list[Path], size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="autoft-decode-speed-") as folder:
        out = cache.RowFile(Path(folder, "x.npy"), (len(paths), 3, size, size))  # the cache entry's file
        try:
            decode.decode_into(list(paths), out, size, BICUBIC)
        finally:
            out.close()


SIDES: dict[str, Callable[[list[Path], int], None]] = {
    "plain_pil": plain_pil, "single_core": single_core, "autoft": autoft_memory, "autoft_mapped": autoft_mapped,
}  # fmt: skip


def measure(paths: list[Path], size: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, CPU seconds of the process) of every run of every side, the sides alternating."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in SIDES}
    for _ in range(repeats):
        for name, side in SIDES.items():
            wall, cpu = time.perf_counter(), time.process_time()
            side(paths, size)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return runs


def _row(side: str, rate: float, best: tuple[float, float], runs: list[tuple[float, float]]) -> dict:
    wall, cpu = best
    seconds = " ".join(f"{w:.2f}" for w, _ in runs)
    return {"side": side, "images_per_s": round(rate, 1), "cores_used": round(cpu / wall, 2), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="the JPEGs' side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="the working resolution decoded to")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("demo_data/bench/jpegs"), help="where the JPEGs go")
    parser.add_argument("--csv", type=Path, help="also write one row per side to this CSV file")
    args = parser.parse_args()
    paths = write_jpegs(args.data / f"{args.size}px-{args.images}", count=args.images, size=args.size)
    load_before = os.getloadavg()[0]
    runs = measure(paths, args.image_size, args.repeats)
    best = {name: min(r) for name, r in runs.items()}  # each side's fastest run (wall, its CPU)
    rate = {name: args.images / wall for name, (wall, _) in best.items()}
    cores = len(os.sched_getaffinity(0))
    # On a shared machine a side gets what the scheduler leaves it: CPU seconds / wall seconds says how many cores
    # it really had, and images per CPU second is the single-core rate free of the other jobs.
    per_cpu_second = args.images / best["single_core"][1]
    rows = [_row(name, rate[name], best[name], r) for name, r in runs.items()]
    result = {
        "images": args.images, "size": args.size, "image_size": args.image_size, "cores": cores, "rows": rows,
        "ratio_vs_cores_x_single": round(rate["autoft"] / (cores * rate["single_core"]), 3),
        "ratio_mapped_vs_cores_x_single": round(rate["autoft_mapped"] / (cores * rate["single_core"]), 3),
        "ratio_vs_cores_x_single_cpu_rate": round(rate["autoft"] / (cores * per_cpu_second), 3),
        # threads' overhead alone: autoft's images per CPU second against the single loop's
        "autoft_per_cpu_second_vs_single": round(args.images / best["autoft"][1] / per_cpu_second, 3),
        "speedup_vs_plain_pil": round(rate["autoft"] / rate["plain_pil"], 2),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(result))
    if args.csv is not None:
        extra = {"cores": cores, "load_average": " ".join(map(str, result["load_average"])), "date": result["date"]}
        write_csv(args.csv, [row | extra for row in rows])


if __name__ == "__main__":
    main()
