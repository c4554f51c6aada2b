"""Learn the default preset's portfolio from the portfolio grid, and judge it leave-one-task-out.

Greedy forward selection (as auto-sklearn 2 and Quick-Tune build their portfolios): each step adds the candidate
that most raises the mean, over tasks, of the best chosen recipe's normalized val score, where a task's scores
are normalized over the grid ((val - worst) / (best - worst), so every task weighs the same whatever its
accuracy level). Equal gains (as when the chosen recipes already are the best on every task) go to the
candidate with the better mean normalized score on its own, then to the one listed first in the grid.

Leave-one-task-out: for each task, the portfolio is learned from the other tasks only; on the held-out task the
first k learned recipes "run" (their grid rows) and the one with the best val accuracy is kept, as a search
keeps its best trial; its test accuracy is what is reported, for k = 1..K, beside the untuned recipe and the
hand-written portfolio (the same val-best rule over its recipes) and the val-best of the whole grid.

Tasks whose untuned recipe scores above 95 % test accuracy are left out (no headroom), and so are candidates
that did not run on every task.

    .venv/bin/python benchmarks/learn_portfolio.py [--csv benchmarks/results/portfolio-grid.csv] [-k 4] [--write]

``--write`` also learns the portfolio from all tasks and writes it to ``search_spaces/portfolios/image.yaml``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from portfolio_grid import CANDIDATES, HANDWRITTEN, read_grid

__all__ = ["Scores", "greedy_portfolio", "leave_one_task_out", "normalized", "scores_from_rows", "val_best"]

Scores = Mapping[str, Mapping[str, float]]  # task -> recipe -> score
HEADROOM = 0.95  # a task whose untuned recipe scores above this has nothing left to learn from
TABLE = Path(__file__).resolve().parents[1] / "search_spaces" / "portfolios" / "image.yaml"


def scores_from_rows(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """task -> recipe -> ``key`` (best_val or test_at_best_val), the mean over the seeds present."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        values.setdefault(row["task"], {}).setdefault(row["recipe"], []).append(float(row[key]))
    return {task: {r: statistics.fmean(v) for r, v in by.items()} for task, by in values.items()}


def normalized(val: Scores) -> dict[str, dict[str, float]]:
    """Each task's scores mapped to [0, 1] over its recipes (1 = the best); a task where all tie is all 1."""
    result = {}
    for task, by_recipe in val.items():
        worst, best = min(by_recipe.values()), max(by_recipe.values())
        span = best - worst
        result[task] = {r: (v - worst) / span if span > 0 else 1.0 for r, v in by_recipe.items()}
    return result


def greedy_portfolio(val: Scores, candidates: Sequence[str], k: int) -> list[str]:
    """The ``k`` candidates chosen greedily to maximize the mean over tasks of the best chosen normalized val.

    >>> greedy_portfolio({"t1": {"a": 1.0, "b": 0.0}, "t2": {"a": 0.0, "b": 1.0}}, ["a", "b"], 2)
    ['a', 'b']
    """
    norm = normalized(val)
    alone = {r: statistics.fmean(norm[t][r] for t in norm) for r in candidates}
    chosen: list[str] = []
    for _ in range(min(k, len(candidates))):

        def gain(recipe: str) -> tuple[float, float]:
            # Once the chosen cover every task, all gains tie: the better recipe on its own is the useful next one.
            return statistics.fmean(max(norm[t][r] for r in [*chosen, recipe]) for t in norm), alone[recipe]

        remaining = [c for c in candidates if c not in chosen]
        chosen.append(max(remaining, key=gain))  # max keeps the first of equals: the grid's order breaks ties
    return chosen


def val_best(val: Mapping[str, float], recipes: Sequence[str]) -> str:
    """The recipe with the best val score among ``recipes`` (the first of equals), as a search keeps its best."""
    return max(recipes, key=lambda r: val[r])


def dataset_of(task: str) -> str:
    """The data set a task was built from: ``digits-few@16`` and ``digits-few@24`` share ``digits-few``."""
    return task.split("@")[0]


def leave_one_task_out(
    val: Scores, test: Scores, candidates: Sequence[str], k: int, *, group: Callable[[str], str] = str
) -> dict[str, dict[str, Any]]:
    """Per held-out task: the portfolio learned without it (and without every task of its ``group``: with
    :func:`dataset_of`, the same data set at another resolution is left out too), and the test score of the
    val-best of its first 1..k.

    >>> val = {"t1": {"a": 0.9, "b": 0.1}, "t2": {"a": 0.8, "b": 0.2}, "t3": {"a": 0.1, "b": 0.9}}
    >>> leave_one_task_out(val, val, ["a", "b"], 1)["t3"]["test"]
    [0.1]
    """
    result = {}
    for held_out in val:
        others = {t: v for t, v in val.items() if group(t) != group(held_out)}
        learned = greedy_portfolio(others, candidates, k)
        picks = [val_best(val[held_out], learned[: i + 1]) for i in range(len(learned))]
        result[held_out] = {"learned": learned, "picks": picks, "test": [test[held_out][p] for p in picks]}
    return result


def _complete(val: Scores) -> list[str]:
    """Candidates (in the grid's order) with a score on every task."""
    return [c for c in CANDIDATES if all(c in by_recipe for by_recipe in val.values())]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def loto_table(
    val: Scores, test: Scores, seconds: Scores, candidates: Sequence[str], k: int, *, group: Callable[[str], str] = str
) -> tuple[str, dict[str, Any]]:
    """The markdown table of the leave-one-task-out evaluation (test accuracy in %), its means and costs."""
    loto = leave_one_task_out(val, test, candidates, k, group=group)
    hand = [h for h in HANDWRITTEN if h in candidates]
    header = ["task", "untuned", f"hand-written ({len(hand)})", *[f"learned k={i + 1}" for i in range(k)], "grid best"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    columns: dict[str, list[float]] = {h: [] for h in header[1:]}
    for task, held in loto.items():
        values = [
            test[task]["untuned"],
            test[task][val_best(val[task], hand)],
            *held["test"],
            test[task][val_best(val[task], candidates)],
        ]
        for name, value in zip(header[1:], values, strict=True):
            columns[name].append(value)
        lines.append(f"| {task} | " + " | ".join(_pct(v) for v in values) + " |")
    means = {name: statistics.fmean(v) for name, v in columns.items()}
    lines.append("| **mean** | " + " | ".join(f"**{_pct(v)}**" for v in means.values()) + " |")
    cost = {
        "hand-written": statistics.fmean(sum(seconds[t][r] for r in hand) for t in loto),
        f"learned k={k}": statistics.fmean(sum(seconds[t][r] for r in held["learned"]) for t, held in loto.items()),
    }
    lines.append("")
    lines.append("Seconds to run the portfolio on the held-out task, mean over tasks (grid timings, shared machine): "
                 + ", ".join(f"{name} {value:.0f} s" for name, value in cost.items()) + ".")  # fmt: skip
    return "\n".join(lines), {"means": means, "loto": loto, "seconds": cost}


def write_table(path: Path, portfolio: Sequence[str], *, tasks: Sequence[str], seeds: Sequence[int], csv: Path) -> None:
    """The learned portfolio as a YAML table, with a header naming what it was learned from and how."""
    header = [
        "# The default preset's image portfolio, learned (issue 14); do not edit by hand, regenerate it:",
        f"#   .venv/bin/python benchmarks/learn_portfolio.py --csv {csv} -k {len(portfolio)} --write",
        f"# Learned by greedy selection from {csv} (benchmarks/portfolio_grid.py, seeds {', '.join(map(str, seeds))})",
        f"# over the suite: {', '.join(tasks)}",
        "# (tf_efficientnet_lite0, ImageNet weights). Recipes in order of selection; epochs are capped by the budget.",
    ]
    entries = []
    for name in portfolio:
        flow = yaml.safe_dump(dict(CANDIDATES[name]), default_flow_style=True, sort_keys=False, width=10_000).strip()
        entries.append(f"  # {name}\n  - {flow}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\nportfolio:\n" + "\n".join(entries) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/portfolio-grid.csv"))
    parser.add_argument("-k", type=int, default=4, help="portfolio size (default 4)")
    parser.add_argument(
        "--leave-out",
        choices=("dataset", "task"),
        default="dataset",
        help="what the evaluation holds out: the task's whole data set (default; its other resolutions too) or the "
        "task alone",
    )
    parser.add_argument("--write", action="store_true", help=f"write the portfolio learned on all tasks to {TABLE}")
    args = parser.parse_args()
    rows = read_grid(args.csv)
    if not rows:
        raise SystemExit(f"{args.csv} has no rows; run benchmarks/portfolio_grid.py first.")
    val, test = scores_from_rows(rows, "best_val"), scores_from_rows(rows, "test_at_best_val")
    saturated = sorted(t for t in test if test[t].get("untuned", 0.0) > HEADROOM or "untuned" not in test[t])
    for task in saturated:
        print(f"left out: {task} (untuned {test[task].get('untuned')}: no headroom or not run)", file=sys.stderr)
        del val[task], test[task]
    candidates = _complete(val)
    missing = [r for r in ("untuned", *HANDWRITTEN) if r not in candidates]
    if missing or len(val) < 2:
        raise SystemExit(f"The grid is not far enough: {len(val)} tasks; not on every task yet: {', '.join(missing)}.")
    print(f"{len(val)} tasks, {len(candidates)} candidates on every task, seeds {sorted({r['seed'] for r in rows})}")
    seconds = scores_from_rows(rows, "seconds")
    group = dataset_of if args.leave_out == "dataset" else str
    table, summary = loto_table(val, test, seconds, candidates, args.k, group=group)
    print(table)
    for task, held in summary["loto"].items():
        print(f"  {task}: learned without it: {', '.join(held['learned'])}")
    learned = greedy_portfolio(val, candidates, args.k)
    print("learned on all tasks:", ", ".join(learned))
    if args.write:
        seeds = sorted({r["seed"] for r in rows})
        write_table(TABLE, learned, tasks=list(val), seeds=seeds, csv=args.csv)
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
