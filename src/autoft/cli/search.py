"""``autoft search``: its arguments, the configuration they make, logging, the live display and the summary."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import optuna
import yaml
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from autoft import objectives, report, results, selection, space, tasks
from autoft.cli.output import console
from autoft.config import BACKENDS, PRUNERS, SAMPLERS, SearchConfig, parse_duration
from autoft.controller import Progress as SearchProgress
from autoft.controller import SearchResult, run_search
from autoft.keeper import check_run_dir
from autoft.tasks.image import decode

__all__ = ["add_parser", "run", "summary"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``search`` command's arguments."""
    s = commands.add_parser(
        "search",
        help="search fine-tuning strategies and export the best tuned model",
        description="Search fine-tuning strategies for a pretrained timm model on an image folder; the best "
        "model is exported to RUN_DIR/best. Running the same command again continues the same study.",
    )
    s.add_argument(
        "--model",
        required=True,
        help="timm model name, e.g. resnet50; several (resnet50,efficientnet_b0) make the model a searched choice",
    )
    s.add_argument(
        "--data",
        required=True,
        type=Path,
        help="image folder: train/ and val/ (optional test/) of class folders, or class folders only",
    )
    s.add_argument(
        "--task",
        default="auto",
        help="image, text (sentence classification) or ner (token classification); default: detected from --data "
        "(.csv/.tsv/.jsonl: text, CoNLL .txt/.conll: ner, else image)",
    )
    s.add_argument("--text-column", help="text: the sentence column (a,b for sentence pairs; default: detected)")
    s.add_argument("--label-column", help="text: the label column (default: detected: label, labels, class, ...)")
    s.add_argument("--encoding", default="utf-8", help="text: the data files' encoding (default utf-8)")
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
        "--cache-dir",
        type=Path,
        help="keep decoded images in this folder; later searches map them instead of decoding (default: "
        "$AUTOFT_CACHE_DIR, else .autoft-cache beside the run dir: runs/.autoft-cache)",
    )
    s.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="do not keep decoded images on disk (every search decodes the images again)",
    )
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
    s.add_argument(
        "--portfolio",
        type=Path,
        metavar="FILE",
        help="try these recipes first instead of the space's own portfolio (YAML: 'portfolio:' and a list of "
        "{knob: value} recipes, e.g. learned from your own tasks with benchmarks/learn_portfolio.py)",
    )
    s.add_argument(
        "--no-exploit",
        dest="exploit",
        action="store_false",
        help="after the portfolio, sample at once instead of first trying the best recipe's neighbours "
        "(learning rate x3 and /3, smaller batch, next freeze depth, augmentation, longer)",
    )
    s.add_argument(
        "--warm-start",
        dest="warm_start_from",
        type=Path,
        metavar="RUN_DIR",
        help="seed a new study with the finished trials of an earlier run on similar data (scores, not models)",
    )
    s.add_argument(
        "--objective",
        default="accuracy",
        help="accuracy (default), or accuracy,params / accuracy,latency / accuracy,params,latency: keep the "
        "Pareto front in RUN_DIR/pareto and export its knee to best/",
    )
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
    s.add_argument(
        "--keep-top",
        type=int,
        default=1,
        help="keep the K best trials' models: best/ plus the runners-up in top/trial-N/ (default 1: best/ only)",
    )
    s.add_argument(
        "--export-adapter",
        action="store_true",
        help="for LoRA / BitFit / norm trials, also write adapter.safetensors beside each kept model: the trained "
        "parameters alone, with the base model's name and weights hash (the kept model has LoRA merged in)",
    )
    s.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each trial's training forward (a compile per trial: pays off for long trials on GPU)",
    )
    s.add_argument(
        "--no-soup",
        dest="soup",
        action="store_false",
        help="never average the --keep-top models into a greedy soup (by default the soup is the final model "
        "when its val accuracy beats the best single trial's)",
    )
    s.add_argument(
        "--refit",
        action="store_true",
        help="final model: the best trial's recipe trained again on train+val (val can no longer judge it)",
    )
    s.add_argument(
        "--no-model-selection",
        dest="model_selection",
        action="store_false",
        help="with several --model names: search them all instead of first dropping the weak ones",
    )
    s.add_argument(
        "--no-priors",
        dest="priors",
        action="store_false",
        help="search the preset's space as it is, without the probe's narrowing (docs/controller.md)",
    )
    s.add_argument(
        "--explain",
        action="store_true",
        help="print the plan (data, linear probe, epoch cost, priors, budget) before the first trial, then search",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="show the library's log messages (and Ray's warnings)")


def _config(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        model=args.model,
        data=args.data,
        task=args.task,
        text_column=args.text_column,
        label_column=args.label_column,
        encoding=args.encoding,
        cache=args.cache,
        cache_dir=args.cache_dir,
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
        exploit=args.exploit,
        portfolio=args.portfolio,
        warm_start_from=args.warm_start_from,
        objectives=args.objective,
        backend=args.backend,
        address=args.address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        keep_top=args.keep_top,
        export_adapter=args.export_adapter,
        compile=args.compile,
        soup=args.soup,
        refit=args.refit,
        model_selection=args.model_selection,
        priors=args.priors,
    ).resolved()


def _on_terminal(record: logging.LogRecord, *, verbose: bool) -> bool:
    """autoft's own records; with -v also Ray's warnings (its start-up notices: token authentication, …)."""
    if record.name.startswith("autoft"):
        return True
    from_ray = record.name == "ray" or record.name.startswith("ray.")
    return verbose and from_ray and record.levelno >= logging.WARNING


def _setup_logging(run_dir: Path, *, verbose: bool) -> None:
    """Everything goes to RUN_DIR/search.log (Ray's records too); the terminal shows autoft's warnings (or all of
    autoft's with -v, and then Ray's warnings as well)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()  # Optuna's records (failed-trial tracebacks) go to search.log, not stderr
    file_handler = logging.FileHandler(run_dir / "search.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal = RichHandler(console=console, show_path=False, show_time=False)
    terminal.setFormatter(logging.Formatter("%(message)s"))
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    terminal.addFilter(lambda record: _on_terminal(record, verbose=verbose))
    logging.basicConfig(level=logging.INFO, handlers=[file_handler, terminal], force=True)


class _Display:
    """A live status line (trial, epoch, current and best score) above which finished trials are listed; before
    the first trial, a bar while images are decoded. ``score_name``: what the task scores (accuracy, entity F1)."""

    def __init__(self, live: Live, total: int | None, *, score_name: str = "accuracy"):
        self.live, self.total, self.strategy, self.score_name = live, total, "", score_name
        self.bar: Progress | None = None

    def decoding(self, done: int, total: int) -> None:
        """Images decoded so far of one split (``decode.reporting`` calls it): the bar, restarted per split."""
        if self.bar is None:
            self.bar = Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=self.live.console)  # fmt: skip
            self.bar.add_task("decoding", total=total)
        (task,) = self.bar.tasks
        if done < task.completed or total != task.total:  # the next split
            self.bar.reset(task.id, total=total)
        self.bar.update(task.id, completed=done)
        self.live.update(self.bar)

    def __call__(self, event: SearchProgress) -> None:
        of = f"/{self.total}" if self.total else ""
        best = f"{event.best:.4f}" if event.best is not None else "-"
        if event.kind == "selection":
            self.live.update(f"[bold]model selection[/] · {event.strategy}")
        elif event.kind == "trial_start":
            self.strategy = event.strategy
            self.live.update(f"[bold]trial {event.trial}{of}[/] starting · best {best}\n  {self.strategy}")
        elif event.kind == "epoch":
            self.live.update(
                f"[bold]trial {event.trial}{of}[/] · epoch {event.epoch}/{event.epochs} · "
                f"val {self.score_name} {event.score:.4f} · best {best}\n  {self.strategy}"
            )
        else:
            score = f"{event.score:.4f}" if event.score is not None else "-"
            colour = {"COMPLETE": "green", "PRUNED": "yellow"}.get(event.state, "red")
            self.live.console.print(f"trial {event.trial:>3}  [{colour}]{event.state:<8}[/] {score}  {self.strategy}")


def _paretosummary(result: SearchResult) -> None:
    """The Pareto front, one row per trial, and which one is best/ and why."""
    labels = [objectives.OBJECTIVES[n].label for n in result.objectives]
    table = Table(title=f"Pareto front ({', '.join(result.objectives)})", show_lines=False)
    for column in ("trial", *labels, "model"):
        table.add_column(column)
    for point in result.pareto:
        cells = [f"{point.values[0]:.4f}", *(f"{v:,.0f}" if v >= 1000 else f"{v:.3g}" for v in point.values[1:])]
        where = "best/ (knee)" if point.trial == result.best_trial else f"pareto/trial-{point.trial:04d}"
        table.add_row(str(point.trial), *cells, where)
    console.print(table)
    console.print(f"best/ is trial {result.best_trial}: {objectives.KNEE_RULE}.")
    console.print(
        "Pruning: the pruner judged each trial's accuracy curve (Optuna cannot prune multi-objective trials itself)."
    )


def _score_name(run_dir: Path) -> str:
    """What the run's task scores, from its config.yaml (the search wrote it with the task resolved)."""
    config_file = run_dir / "config.yaml"
    task = yaml.safe_load(config_file.read_text()).get("task") if config_file.is_file() else None
    return tasks.score_name(task)


def summary(result: SearchResult) -> None:
    multi = len(result.objectives) > 1
    if multi:
        _paretosummary(result)
    score_name = _score_name(result.run_dir)
    table = Table(title="Most accurate trials" if multi else "Best trials", show_lines=False)
    for column in ("trial", f"val {score_name}", "epochs", "seconds", "strategy"):
        table.add_column(column)
    for row in results.ranked_trials(result.study, top=5):
        table.add_row(
            str(row["number"]),
            f"{row['value'][0] if multi else row['value']:.4f}",
            str(row["epochs_run"]),
            str(row["seconds"]),
            row["strategy"],
        )
    console.print(table)
    chosen = selection.summary_line(result.study)
    if chosen:
        console.print(chosen, highlight=False)
    test = f", test {score_name} {result.test_score:.4f}" if result.test_score is not None else ""
    console.print(
        f"Best: trial {result.best_trial}, val {score_name} {result.best_score:.4f}{test}\n"
        f"Model: {result.model_dir}  (load with autoft.load_model)\nStudy: {result.run_dir / 'study.db'}\n"
        f"Report: {result.run_dir / report.REPORT}"
    )
    if result.final is not None:
        console.print(f"final model: {result.final.describe()} because {result.final.reason}", highlight=False)


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    check_run_dir(config.run_dir)  # before the log file goes there: an unusable run dir is one clear error
    _setup_logging(config.run_dir, verbose=args.verbose)
    with Live("preparing model and data…", console=console, transient=True, refresh_per_second=4) as live:
        explain = (
            (lambda plan: live.console.print(plan.describe(), markup=False, highlight=False)) if args.explain else None
        )
        display = _Display(live, config.trials, score_name=tasks.score_name(config.task))
        with decode.reporting(display.decoding):  # the library decodes silently; this bar is the CLI's
            result = run_search(config, progress=display, on_plan=explain, started_at=args.started_at)
    summary(result)
    return 0
