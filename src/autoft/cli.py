"""The ``autoft`` command: parses arguments, sets up logging and shows progress. Nothing else prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from autoft import results, space
from autoft.config import PRUNERS, SAMPLERS, SearchConfig, parse_duration
from autoft.controller import Progress, SearchResult, run_search
from autoft.errors import AutoftError

__all__ = ["main"]

console = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoft", description="AutoML fine-tuning for pretrained timm vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser(
        "search",
        help="search fine-tuning strategies and export the best tuned model",
        description="Search fine-tuning strategies for a pretrained timm model on an image folder; the best "
        "model is exported to RUN_DIR/best. Running the same command again continues the same study.",
    )
    s.add_argument("--model", required=True, help="timm model name, e.g. resnet50 or efficientnet_lite0")
    s.add_argument(
        "--data",
        required=True,
        type=Path,
        help="image folder: train/ and val/ (optional test/) of class folders, or class folders only",
    )
    s.add_argument("--weights", type=Path, help="load pretrained weights from a .pth/.pt/.safetensors state dict")
    s.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="train from scratch instead of timm's pretrained weights",
    )
    s.add_argument("--trials", type=int, help="number of trials in the study (default 20 unless --timeout is given)")
    s.add_argument("--timeout", help="wall-clock budget for the search, e.g. 90s, 30m, 2h, 1h30m")
    s.add_argument(
        "--space",
        default="default",
        help=f"search space: a preset ({', '.join(space.preset_names())}) or a YAML file (default: default)",
    )
    s.add_argument(
        "--set",
        dest="space_overrides",
        action="append",
        default=[],
        metavar="PARAM.FIELD=VALUE",
        help="change one field of a space parameter, e.g. --set lr.high=1e-2 (repeatable)",
    )
    s.add_argument(
        "--fix",
        dest="space_fixed",
        action="append",
        default=[],
        metavar="PARAM=VALUE",
        help="fix a parameter instead of searching it, e.g. --fix optimizer=adamw (repeatable)",
    )
    s.add_argument("--max-epochs", type=int, default=10, help="most epochs a trial may train (default 10)")
    s.add_argument("--image-size", type=int, help="working resolution in pixels (default: the model's own)")
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each class held out for validation when there is no val/ folder (default 0.2)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler, splits and trials (trial n uses seed+n)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default tpe)")
    s.add_argument("--pruner", choices=PRUNERS, default="median", help="Optuna pruner (default median)")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///RUN_DIR/study.db)")
    s.add_argument("--study-name", help="study name (default: MODEL-DATAFOLDER)")
    s.add_argument("--run-dir", type=Path, help="where results go (default: runs/STUDY_NAME)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps (default auto)")
    s.add_argument(
        "--no-warm-start",
        dest="warm_start",
        action="store_false",
        help="do not try the space's portfolio of known strong recipes before sampling",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="show the library's log messages")
    spaces = commands.add_parser("spaces", help="list the bundled search space presets, or show one")
    what = spaces.add_subparsers(dest="spaces_command", required=True)
    what.add_parser("list", help="each preset's name and when to use it")
    show = what.add_parser("show", help="print a preset (or a YAML file) after validating it")
    show.add_argument("name", help="preset name or path to a YAML file")
    show.add_argument("--set", dest="space_overrides", action="append", default=[], metavar="PARAM.FIELD=VALUE")
    show.add_argument("--fix", dest="space_fixed", action="append", default=[], metavar="PARAM=VALUE")
    return parser


def _config(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        model=args.model,
        data=args.data,
        weights=args.weights,
        pretrained=args.pretrained,
        trials=args.trials,
        timeout=parse_duration(args.timeout),
        space=args.space,
        space_overrides=tuple(args.space_overrides),
        space_fixed=tuple(args.space_fixed),
        max_epochs=args.max_epochs,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        sampler=args.sampler,
        pruner=args.pruner,
        storage=args.storage,
        study_name=args.study_name,
        run_dir=args.run_dir,
        device=args.device,
        warm_start=args.warm_start,
    ).resolved()


def _setup_logging(run_dir: Path, *, verbose: bool) -> None:
    """Everything goes to RUN_DIR/search.log; the terminal shows autoft's warnings (or all of autoft's with -v)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.disable_default_handler()
    file_handler = logging.FileHandler(run_dir / "search.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal = RichHandler(console=console, show_path=False, show_time=False)
    terminal.setFormatter(logging.Formatter("%(message)s"))
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    terminal.addFilter(lambda record: record.name.startswith("autoft"))
    logging.basicConfig(level=logging.INFO, handlers=[file_handler, terminal], force=True)


class _Display:
    """A live status line (trial, epoch, current and best score) above which finished trials are listed."""

    def __init__(self, live: Live, total: int | None):
        self.live, self.total, self.strategy = live, total, ""

    def __call__(self, event: Progress) -> None:
        of = f"/{self.total}" if self.total else ""
        best = f"{event.best:.4f}" if event.best is not None else "-"
        if event.kind == "trial_start":
            self.strategy = event.strategy
            self.live.update(f"[bold]trial {event.trial}{of}[/] starting · best {best}\n  {self.strategy}")
        elif event.kind == "epoch":
            self.live.update(
                f"[bold]trial {event.trial}{of}[/] · epoch {event.epoch}/{event.epochs} · "
                f"val acc {event.score:.4f} · best {best}\n  {self.strategy}"
            )
        else:
            score = f"{event.score:.4f}" if event.score is not None else "-"
            colour = {"COMPLETE": "green", "PRUNED": "yellow"}.get(event.state, "red")
            self.live.console.print(f"trial {event.trial:>3}  [{colour}]{event.state:<8}[/] {score}  {self.strategy}")


def _summary(result: SearchResult) -> None:
    table = Table(title="Best trials", show_lines=False)
    for column in ("trial", "val acc", "epochs", "seconds", "strategy"):
        table.add_column(column)
    for row in results.ranked_trials(result.study, top=5):
        table.add_row(
            str(row["number"]),
            f"{row['value']:.4f}",
            str(row["epochs_run"]),
            str(row["seconds"]),
            row["strategy"],
        )
    console.print(table)
    test = f", test accuracy {result.test_score:.4f}" if result.test_score is not None else ""
    console.print(
        f"Best: trial {result.best_trial}, val accuracy {result.best_score:.4f}{test}\n"
        f"Model: {result.model_dir}  (load with autoft.load_model)\nStudy: {result.run_dir / 'study.db'}"
    )


def _search(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config.run_dir, verbose=args.verbose)
    with Live("preparing model and data…", console=console, transient=True, refresh_per_second=4) as live:
        result = run_search(config, progress=_Display(live, config.trials))
    _summary(result)
    return 0


def _spaces(args: argparse.Namespace) -> int:
    """``autoft spaces list`` / ``autoft spaces show NAME``: the presets, to stdout (they are the output)."""
    out = Console(highlight=False, soft_wrap=True)
    if args.spaces_command == "list":
        for name in space.preset_names():
            out.print(f"[bold]{name:<10}[/] {space.preset_description(space.preset_path(name))}")
        return 0
    path = space.preset_path(args.name)
    loaded = space.load_space(args.name, overrides=args.space_overrides, fixed=args.space_fixed)
    if args.space_overrides or args.space_fixed:
        out.print(loaded.to_yaml(), end="", markup=False)
    else:
        out.print(f"# {path}\n{path.read_text()}", end="", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoft`` command; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        return _spaces(args) if args.command == "spaces" else _search(args)
    except AutoftError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: the study keeps every finished trial; run the same command to continue.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
