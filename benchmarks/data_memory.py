"""Memory of searches over decoded images past the memory bound, and of two concurrent Ray trials (issue 17).

A generated folder of photo-like JPEGs (``data_cache.write_folder``: ``--images`` in 4 class folders, no val/, so
train/val are split off it), searched at ``--image-size`` px with a small model (random weights) under
``AUTOFT_DATA_MEMORY=--bound`` GiB. Each search runs in a fresh child process (so its peak is its own) and is stopped
``--train-seconds`` after its first trial starts (a SIGINT: the trial ends at its next step, the search wraps up).
While it runs a thread samples ``/proc/self/status`` every 0.1 s: peak ``RssAnon`` (memory only this process
holds: what the bound is about) and peak ``RssFile`` (pages of mapped files: the page cache, which the kernel takes
back under pressure); ``ru_maxrss`` is the kernel's peak of both together.

Searches, in order, one cache folder:

1. ``small``: a 200-image folder (0.03 GB decoded, in memory): the model, torch and the trial loop alone;
2. ``first``: the large folder, a new cache: decodes into it, splits past the bound are written beside it;
3. ``second``: the same folder in a new run dir: maps the cache;
4. ``ray``: two concurrent Ray trials (``--backend ray --cpus-per-trial 1``, 2 trials) on the mapped cache; while
   both run, the driver reads every Ray worker's ``/proc/<pid>/smaps``: RSS and PSS in all and of the cache's
   files (PSS shares each page among the processes that map it: two workers mapping one copy show PSS of the
   files about half their RSS), and its anonymous memory (a private copy of the data would be there).

Target: peak RssAnon of ``first`` and ``second`` <= the bound + ``small``'s; the Ray workers map one copy. Prints
one JSON line; ``--csv`` writes the rows. ``--distinct N`` hard-links the set to N generated JPEGs (the issue's
100,000-image set without 40 minutes of writing them); ``--searches`` picks which of small/first/second run.

    .venv/bin/python benchmarks/data_memory.py [--images 10000] [--bound 0.2] [--image-size 224]
        [--csv benchmarks/results/data-memory.csv] [--distinct 400] [--searches small,first,second] [--no-ray]
        [--profile-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import write_csv
from data_cache import write_folder
from decode_speed import write_jpegs

MIB = 2**20


def write_linked_folder(root: Path, *, images: int, classes: int, size: int, distinct: int) -> Path:
    """``images`` JPEGs in ``classes`` class folders, hard links to ``distinct`` generated ones (a 100,000-image set
    in seconds and no disk: every link is still a file of its own to list, key and decode)."""
    marker = root / f".complete-{images}"
    if marker.is_file():
        return root
    sources = write_jpegs(root / "sources", count=distinct, size=size)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images // classes):
            link = folder / f"{i:06d}.jpg"
            if not link.exists():
                os.link(sources[(k * 7919 + i) % distinct], link)
    shutil.move(root / "sources", root.parent / f".{root.name}-sources")  # not a class folder of the set
    marker.touch()
    return root


def _status() -> dict[str, int]:
    """This process's RSS parts in bytes, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[name] = int(value.split()[0]) * 1024
    return out


def _smaps(pid: int, files: str) -> dict[str, float]:
    """MiB of process ``pid``: RSS, PSS and anonymous in all, and RSS / PSS of mappings whose path contains
    ``files``."""
    total = {"rss": 0, "pss": 0, "anon": 0, "files_rss": 0, "files_pss": 0}
    ours = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if not head[0].endswith(":"):  # a mapping's first line: address range ... [path]
            ours = len(head) > 5 and files in head[5]
            continue
        field, kib = head[0][:-1], int(head[1]) if head[1].isdigit() else 0
        if field in ("Rss", "Pss", "Anonymous"):
            key = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon"}[field]
            total[key] += kib
            if ours and key != "anon":
                total[f"files_{key}"] += kib
    return {k: round(v / 1024, 1) for k, v in total.items()}


def _ray_workers() -> list[int]:
    """Pids of this machine's Ray trial workers (process title ``ray::ImplicitFunc.train``: Tune's trainable)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and ("ImplicitFunc" in title or "trainable" in title):
            found.append(int(proc.name))
    return found


def _watch_ray(started: list[float], workers: dict, args: argparse.Namespace) -> None:
    """Ray trials report no start to the driver's progress: the clock starts when two workers are busy; half-way
    their memory is read, at the end the search is stopped."""
    pids = _ray_workers()
    if len(pids) < 2:
        return
    if not started:
        started.append(time.monotonic())
    elif time.monotonic() - started[0] > args.train_seconds / 2:
        for pid in pids:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            workers[str(pid)] = {"title": title} | _smaps(pid, str(args.cache))
        threading.Timer(args.train_seconds / 2, os.kill, (os.getpid(), signal.SIGINT)).start()


def child(args: argparse.Namespace) -> None:
    """One search in this process; prints its memory figures as JSON."""
    from autoft.config import SearchConfig
    from autoft.controller import Progress, SearchInterrupted, run_search

    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done, started, workers = threading.Event(), [], {}

    def sample() -> None:
        while not done.wait(0.1):
            for name, value in _status().items():
                peaks[name] = max(peaks.get(name, 0), value)
            if args.ray and not workers:
                _watch_ray(started, workers, args)

    def on_progress(event: Progress) -> None:
        if event.kind == "trial_start" and not started:
            started.append(time.monotonic())
            threading.Timer(args.train_seconds, os.kill, (os.getpid(), signal.SIGINT)).start()

    ray = {"backend": "ray", "trials": 2, "cpus_per_trial": 1.0, "max_concurrent": 2} if args.ray else {"trials": 1}
    config = SearchConfig(model=args.model, data=args.data, pretrained=False, image_size=args.image_size,
                          max_epochs=1, run_dir=args.run_dir, cache_dir=args.cache, warm_start=False,
                          **ray)  # fmt: skip
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    began = time.monotonic()
    profiler = cProfile.Profile() if args.profile else None
    with contextlib.suppress(SearchInterrupted):  # the stop asked for; the search wrapped up
        if profiler is not None:
            profiler.enable()
        try:
            run_search(config, progress=on_progress)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
    done.set()
    thread.join()
    result = {f"peak_{k}_mib": round(v / MIB, 1) for k, v in peaks.items()}
    result["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["to_first_trial_s"] = round(started[0] - began, 1) if started else None
    print("RESULT " + json.dumps(result | ({"workers": workers} if args.ray else {})), flush=True)


def run_child(name: str, data: Path, work: Path, args: argparse.Namespace, *, ray: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", "--data", str(data), "--cache", str(work / "cache"),
               "--run-dir", str(work / "runs" / name), "--model", args.model, "--image-size", str(args.image_size),
               "--train-seconds", str(args.train_seconds)] + (["--ray"] if ray else [])  # fmt: skip
    if args.profile_dir is not None:  # one cProfile file per search, e.g. to see where `second` spends its start
        command += ["--profile", str(args.profile_dir / f"{name}.prof")]
    env = os.environ | ({"AUTOFT_DATA_MEMORY": str(args.bound)} if args.bound else {})
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return {"search": name} | json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=256, help="the JPEGs' side in pixels")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--bound", type=float, help="AUTOFT_DATA_MEMORY, GiB (default: autoft's, RAM / 4)")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--train-seconds", type=float, default=40.0)
    parser.add_argument("--data", type=Path, default=Path("demo_data/bench/cache-folder"))
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--no-ray", dest="with_ray", action="store_false")
    parser.add_argument("--distinct", type=int, default=0, help="hard-link the set to this many distinct JPEGs")
    parser.add_argument("--searches", default="small,first,second", help="which of small, first, second to run")
    parser.add_argument("--profile-dir", type=Path, help="write each search's cProfile to <dir>/<search>.prof")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.distinct:
        large = write_linked_folder(args.data / f"{args.size}px-{args.images}-linked", images=args.images, classes=4,
                                    size=args.size, distinct=args.distinct)  # fmt: skip
    else:
        large = write_folder(args.data / f"{args.size}px-{args.images}", images=args.images, classes=4, size=args.size)
    small = write_folder(args.data / f"{args.size}px-200", images=200, classes=4, size=args.size)
    work, load = Path(tempfile.mkdtemp(prefix="autoft-data-memory-")), os.getloadavg()[0]
    try:
        names = args.searches.split(",")
        rows = [run_child(name, small if name == "small" else large, work, args) for name in names]
        if args.with_ray:
            rows.append(run_child("ray", large, work, args, ray=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decoded = args.images * 3 * args.image_size**2 / MIB
    bound = args.bound * 2**30 if args.bound else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    base = rows[0]["peak_RssAnon_mib"] if rows[0]["search"] == "small" else 0.0
    large_rows = [r for r in rows if r["search"] in ("first", "second")]
    result = {
        "images": args.images, "image_size": args.image_size, "decoded_mib": round(decoded), "model": args.model,
        "bound_mib": round(bound / MIB), "rows": rows,
        "anon_within_bound_plus_small": all(r["peak_RssAnon_mib"] <= bound / MIB + base for r in large_rows),
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)], "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(result))
    if args.csv is not None:
        flat = [{k: v for k, v in row.items() if k != "workers"} for row in rows]
        for row in rows:  # one more row per Ray worker
            for pid, figures in row.get("workers", {}).items():
                flat.append({"search": f"ray worker {pid}"} | figures)
        keys = list(dict.fromkeys(k for row in flat for k in row))
        write_csv(args.csv, [{k: row.get(k, "") for k in keys} | {"images": args.images, "bound_mib":
                  round(bound / MIB), "load_average": " ".join(map(str, result["load_average"]))}
                  for row in flat])  # fmt: skip


if __name__ == "__main__":
    main()
