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

from autoft import results
from autoft.config import BACKENDS, PRUNERS, SAMPLERS, SearchConfig, parse_duration
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
    s.add_argument("--space", default="default", help="search space preset name or YAML file (default: default)")
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
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="local (in-process) or ray (Ray Tune); auto: ray when --address is given or >1 GPU is visible",
    )
    s.add_argument("--address", help="Ray cluster to run on, e.g. auto or 10.0.0.1:6379 (default: start one here)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each Ray trial reserves (default 1)")
    s.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs each Ray trial reserves; 0.5 puts two trials on a GPU (default 1 if the cluster has GPUs, else 0)",
    )
    s.add_argument("--max-concurrent", type=int, help="most Ray trials at once (default: as many as resources allow)")
    s.add_argument("-v", "--verbose", action="store_true", help="show the library's log messages")
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
        backend=args.backend,
        address=args.address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoft`` command; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        return _search(args)
    except AutoftError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: the study keeps every finished trial; run the same command to continue.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
