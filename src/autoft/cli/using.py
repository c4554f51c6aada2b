"""The commands that use a finished search: ``report``, ``dashboard``, ``predict``, ``evaluate``, ``export``;
``spaces``, which shows the bundled search spaces; and ``cache``, which lists or clears the decoded-image cache."""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from autoft import export, report, space
from autoft.cli.output import console
from autoft.config import CACHE_FOLDER
from autoft.errors import AutoftError
from autoft.tasks.base import LoadedModel
from autoft.tasks.image import cache, data

__all__ = ["COMMANDS", "add_parsers"]

DEFAULT_CACHE = Path("runs") / CACHE_FOLDER  # beside the default run dirs (runs/STUDY_NAME)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """The commands that look at a finished search or use its tuned model, and ``spaces``."""
    spaces = commands.add_parser("spaces", help="list the bundled search space presets, or show one")
    what = spaces.add_subparsers(dest="spaces_command", required=True)
    what.add_parser("list", help="each preset's name and when to use it")
    show = what.add_parser("show", help="print a preset (or a YAML file) after validating it")
    show.add_argument("name", help="preset name or path to a YAML file")
    show.add_argument("--set", dest="space_overrides", action="append", default=[], metavar="PARAM.FIELD=VALUE")
    show.add_argument("--fix", dest="space_fixed", action="append", default=[], metavar="PARAM=VALUE")
    c = commands.add_parser("cache", help="list or clear the decoded-image cache (--cache-dir / $AUTOFT_CACHE_DIR)")
    c.add_argument("cache_command", choices=("list", "clear"), help="list the entries, or remove them all")
    c.add_argument(
        "--cache-dir", type=Path, help=f"the cache folder (default $AUTOFT_CACHE_DIR, else {DEFAULT_CACHE}, as search)"
    )
    r = commands.add_parser(
        "report",
        help="write RUN_DIR/report.html: the study's figures, the best model's scores and mistakes",
        description="Write RUN_DIR/report.html, one self-contained page that opens offline (also written "
        "at the end of every search).",
    )
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder, e.g. runs/resnet50-data")
    r.add_argument("--png", action="store_true", help="also write each figure as RUN_DIR/figures/NAME.png (Kaleido)")
    r.add_argument("--device", default="cpu", help="device to evaluate the best model on (default cpu)")
    d = commands.add_parser("dashboard", help="start optuna-dashboard on the run's study")
    d.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder, e.g. runs/resnet50-data")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p = commands.add_parser("predict", help="classify image files, folders or globs with a tuned model")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="an exported model, e.g. runs/x/best")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (recursive) or glob patterns; for a text model: sentences, files of lines, or "
        "CSV/TSV/JSONL files (their text column)",
    )
    p.add_argument("--text-column", help="text models: the column of a CSV/TSV/JSONL file to classify")
    p.add_argument("--encoding", default="utf-8", help="text models: the files' encoding (default utf-8)")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to list per image (default 3)")
    p.add_argument("--output", type=Path, help="write the predictions as CSV here instead of a table")
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and classified at once (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps (default auto)")
    e = commands.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on a folder")
    e.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="an exported model, e.g. runs/x/best")
    e.add_argument(
        "data",
        type=Path,
        metavar="DATA",
        help="a folder of class sub-folders, e.g. data/test; for a text model a labelled file (CSV/TSV/JSONL, CoNLL)",
    )
    e.add_argument("--text-column", help="text models: the sentence column (default: detected)")
    e.add_argument("--label-column", help="text models: the label column (default: detected)")
    e.add_argument("--encoding", default="utf-8", help="text models: the file's encoding (default utf-8)")
    e.add_argument("--batch-size", type=int, default=64, help="images decoded and classified at once (default 64)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps (default auto)")
    x = commands.add_parser("export", help="write an ONNX or TorchScript file of a tuned model, checked against it")
    x.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="an exported model, e.g. runs/x/best")
    x.add_argument("--format", required=True, choices=export.EXPORT_FORMATS, help="onnx or torchscript")
    x.add_argument("--output", type=Path, help="file to write (default MODEL_DIR/model.onnx or model.pt)")
    x.add_argument(
        "--check",
        nargs="+",
        metavar="INPUT",
        help="inputs to compare the file with PyTorch on, as predict takes them: image files or folders; sentences "
        "or files of them (default: random images; a few built-in sentences)",
    )


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


def _report(args: argparse.Namespace) -> int:
    path = report.write_report(args.run_dir, device=args.device, png=args.png)
    console.print(f"Report: {path}" + (f"\nFigures: {args.run_dir / 'figures'}" if args.png else ""))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise AutoftError(
            "The dashboard needs optuna-dashboard; install it with: pip install 'autoft[report]'."
        ) from None
    config, _ = report.load_study(args.run_dir)
    console.print(f"optuna-dashboard for {config['study_name']}: http://{args.host}:{args.port}/  (Ctrl-C stops it)")
    run_server(config["storage"], host=args.host, port=args.port)
    return 0


def _counting_progress(total: int, what: str) -> Progress:
    bar = Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True
    )
    bar.add_task(what, total=total)
    return bar


def _predict_text(tuned: LoadedModel, args: argparse.Namespace) -> int:
    from autoft.tasks.text.using import read_inputs

    sentences = read_inputs(args.paths, text_column=args.text_column, encoding=args.encoding)
    if tuned.task.token_level:
        header = ["sentence", "entities"]
        found = tuned.predict(sentences)
        table = [
            [s, "; ".join(f"{e['text']} ({e['type']})" for e in ents) or "-"]
            for s, ents in zip(sentences, found, strict=True)
        ]
    else:
        k = min(args.top_k, len(tuned.classes))
        values, indices = tuned.predict_proba(sentences).topk(k, dim=1)
        header = ["sentence"] + [f"{name}{i + 1}" for i in range(k) for name in ("class", "probability")]
        table = [
            [s] + [v for i, p in zip(idx, vals, strict=True) for v in (tuned.classes[i], round(p, 6))]
            for s, vals, idx in zip(sentences, values.tolist(), indices.tolist(), strict=True)
        ]
    return _show_predictions(header, table, args.output)


def _show_predictions(header: list[str], table: list[list], output: Path | None) -> int:
    if output:
        with output.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *table])
        console.print(f"{len(table)} predictions written to {output}")
        return 0
    out = Table(*header, box=None)
    for row in table:
        out.add_row(*(f"{v:.4f}" if isinstance(v, float) else v for v in row))
    Console().print(out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    tuned = export.load_model(args.model_dir, device=args.device)
    if not isinstance(tuned, export.TunedModel):
        return _predict_text(tuned, args)
    files = data.find_images(args.paths)
    with _counting_progress(len(files), "predicting") as bar:
        rows = export.predict_files(
            tuned, files, top_k=args.top_k, batch_size=args.batch_size, progress=lambda n: bar.advance(0, n)
        )
    k = max(len(r.classes) for r in rows)
    header = ["path"] + [f"{name}{i + 1}" for i in range(k) for name in ("class", "probability")]
    table = [[str(r.path)] + [v for pair in zip(r.classes, r.probabilities, strict=True) for v in pair] for r in rows]
    return _show_predictions(header, table, args.output)


def _evaluate_text(tuned: LoadedModel, args: argparse.Namespace) -> int:
    result = tuned.evaluate(args.data, text_column=args.text_column, label_column=args.label_column,
                            encoding=args.encoding)  # fmt: skip
    out = Console()
    macro = f", macro-F1 {result.macro_f1:.4f}" if result.macro_f1 is not None else ""
    out.print(f"{result.score_name} {result.score:.4f}{macro} on {result.count} sentences in {args.data}")
    per_class = Table("class", result.per_class_name, box=None)
    for name, value in result.per_class.items():
        per_class.add_row(name, f"{value:.4f}")
    out.print(per_class)
    if result.confusion is not None:
        _print_confusion(out, tuned.classes, result.confusion)
    return 0


def _print_confusion(out: Console, classes: Sequence[str], confusion: list[list[int]]) -> None:
    matrix = Table("true \\ predicted", *classes, box=None)
    for name, row in zip(classes, confusion, strict=True):
        matrix.add_row(name, *map(str, row))
    out.print(matrix)


def _evaluate(args: argparse.Namespace) -> int:
    tuned = export.load_model(args.model_dir, device=args.device)
    if not isinstance(tuned, export.TunedModel):
        return _evaluate_text(tuned, args)
    count = len(data.find_images([args.data])) if args.data.is_dir() else 0
    with _counting_progress(count, "evaluating") as bar:
        result = export.evaluate_folder(
            tuned, args.data, batch_size=args.batch_size, progress=lambda n: bar.advance(0, n)
        )
    out = Console()
    out.print(f"accuracy {result.accuracy:.4f} on {result.count} images in {args.data}")
    per_class = Table("class", "accuracy", "images", box=None)
    for i, (name, value) in enumerate(result.per_class.items()):
        per_class.add_row(name, "-" if value is None else f"{value:.4f}", str(sum(result.confusion[i])))
    out.print(per_class)
    _print_confusion(out, result.classes, result.confusion)
    return 0


def _export(args: argparse.Namespace) -> int:
    path, difference = export.export_model(args.model_dir, format=args.format, output=args.output, examples=args.check)
    console.print(f"Wrote {path}; checked against the PyTorch model on a batch: max abs difference {difference:.3g}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    folder = args.cache_dir or (Path(os.environ[cache.ENV]).expanduser() if os.environ.get(cache.ENV) else None)
    folder = folder or DEFAULT_CACHE  # where a search with the default run dir keeps it
    if folder.exists() and not folder.is_dir():
        raise AutoftError(f"The cache folder {folder} is a file; pass --cache-dir the folder searches cache in.")
    if args.cache_command == "clear":
        console.print(f"Cleared {folder}: {cache.clear(folder) / 2**20:.1f} MiB freed.")
        return 0
    found = cache.entries(folder)
    table = Table("entry", "source", "image size", "images", "MiB", "created", box=None)
    for e in found:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created"]))
        table.add_row(e["name"][:12], e["source"], str(e["image_size"]), str(e["images"]), f"{e['bytes'] / 2**20:.1f}",
                      created)  # fmt: skip
    Console().print(table if found else f"{folder}: no cached images.")
    return 0


COMMANDS = {
    "cache": _cache,
    "spaces": _spaces,
    "report": _report,
    "dashboard": _dashboard,
    "predict": _predict,
    "evaluate": _evaluate,
    "export": _export,
}
