"""The study report: one self-contained ``report.html`` (Plotly's JavaScript embedded once, opens offline).

The figures and the plain data behind them are :mod:`autoft.figures`; this module reads a run, lays out the
sections and writes the page.

Every section is built in two steps, as Optuna's own plots are: plain data first (dicts and lists that
tests check), figures second. A study with one trial, only failed trials or no learning curves still
gives a report; the sections that cannot be drawn say why.
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import torch
import yaml
from optuna.trial import TrialState

from autoft import export, figures, objectives, tasks
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.tasks.base import Dataset, LoadedModel, Split, Task
from autoft.trial import predict_logits

__all__ = ["REPORT", "StudyReport", "build_report", "load_study", "render_html", "write_pngs", "write_report"]

log = logging.getLogger(__name__)

REPORT = "report.html"


# ----------------------------------------------------------------------------- reading a run


def load_study(run_dir: Path) -> tuple[dict[str, Any], optuna.Study]:
    """The run's saved configuration and its Optuna study (the single record of the search)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise AutoftError(
            f"{run_dir} is not a run folder (no config.yaml); give the folder autoft search wrote, "
            "e.g. runs/resnet50-data."
        )
    config = yaml.safe_load(config_file.read_text())
    try:
        study = optuna.load_study(study_name=config["study_name"], storage=config["storage"])
    except KeyError:
        raise AutoftError(
            f"{config_file} names study {config['study_name']!r} but its storage {config['storage']} has no such "
            "study; was the study deleted?"
        ) from None
    return config, study


# ----------------------------------------------------------------------------- the report


@dataclass
class StudyReport:
    """What the report shows, section by section: titles with figures, notes and HTML fragments."""

    summary: dict[str, Any]
    sections: list[tuple[str, list[Any]]] = field(default_factory=list)  # (title, [go.Figure | str note | _Html])
    figures: dict[str, go.Figure] = field(default_factory=dict)

    def add(self, title: str, *items: Any) -> None:
        self.sections.append((title, list(items)))

    def figure(self, name: str, figure: go.Figure) -> go.Figure:
        self.figures[name] = figure
        return figure


@dataclass(frozen=True)
class _Html:
    text: str


def _study_sections(report: StudyReport, study: optuna.Study) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(study.directions) > 1
    if multi:
        pareto = figures.pareto_data(study, best_trial=report.summary.get("best_trial"))
        report.add("Pareto front", report.figure("pareto_front", figures.pareto_figure(study, pareto)))
        if pareto["best_trial"] is not None:
            report.add("How best/ was chosen", f"best/ holds trial {pareto['best_trial']}: {objectives.KNEE_RULE}.")
    elif complete:
        history = figures.history_figure(study, score_name=report.summary["score_name"])
        report.add("Optimization history", report.figure("history", history))
    else:
        report.add("Optimization history", "No trial completed, so there is no score to plot.")

    curves = figures.curves_data(study)
    if curves:
        figure = figures.curves_figure(curves, score_name=report.summary["score_name"])
        report.add("Learning curves", report.figure("learning_curves", figure))
    else:
        report.add("Learning curves", "No trial reported a validation score per epoch (no intermediate values).")

    importances, why = figures.importance_data(study)
    if not importances:
        report.add("Parameter importances", why)
        return
    report.add("Parameter importances", report.figure("importances", figures.importance_figure(importances)))
    names = list(importances)
    report.add(
        "Parallel coordinates",
        report.figure("parallel", optuna.visualization.plot_parallel_coordinate(study, params=names)),
    )
    report.add("Slice", report.figure("slice", optuna.visualization.plot_slice(study, params=names)))
    if len(names) >= 2:
        contour = optuna.visualization.plot_contour(study, params=names[:2])
        report.add(f"Contour of {names[0]} and {names[1]}", report.figure("contour", contour))
    else:
        report.add("Contour", "A contour needs two parameters that vary; only one did.")


def _mistakes_html(mistakes: list[dict[str, Any]], examples: list[str]) -> _Html:
    cells = "".join(
        f"<figure>{example}"
        f"<figcaption>true <b>{html.escape(m['true'])}</b><br>predicted <b>{html.escape(m['predicted'])}</b>"
        f" ({m['confidence']:.0%})</figcaption></figure>"
        for m, example in zip(mistakes, examples, strict=True)
    )
    return _Html(f'<div class="mistakes">{cells}</div>')


def _model_sections(
    report: StudyReport,
    tuned: LoadedModel,
    task: Task,
    splits: dict[str, Split],
    known: Mapping[str, torch.Tensor],
) -> None:
    """The best model on each split: confusion matrix, per-class scores, the examples it got most surely wrong.
    ``known`` holds logits the caller already computed with this model (the search's test score), by split."""
    spec = task.spec_from_meta(tuned.meta)
    for split, examples in splits.items():
        logits = known.get(split)
        if logits is None:
            logits = predict_logits(tuned.model, examples, task, spec, device=tuned.device)
        probabilities, labels, rows = (t.cpu() for t in task.per_example(logits, examples))
        evaluation = export.Evaluation.from_predictions(labels, probabilities.argmax(1), tuned.classes)
        report.summary.setdefault("evaluations", {})[split] = evaluation
        mistakes = figures.confident_mistakes(probabilities, labels, tuned.classes)
        rendered = task.example_html(examples, [int(rows[m["index"]]) for m in mistakes])
        grid: _Html | str = (
            _mistakes_html(mistakes, rendered) if mistakes else f"Nothing in {split} is classified wrongly."
        )
        report.add(
            f"Best model on {split}",
            report.figure(f"confusion_{split}", figures.confusion_figure(evaluation, split)),
            report.figure(f"per_class_{split}", figures.per_class_figure(evaluation, split)),
            _Html(f"<h3>Most confidently wrong on {split}</h3>"),
            grid,
        )


def _load_splits(config: dict[str, Any], task: Task, meta: dict[str, Any]) -> tuple[dict[str, Split], dict[str, int]]:
    """The run's data read again as the search read it (its path, split fraction and seed from config.yaml)."""
    keys = ("model", "data", "task", "val_fraction", "seed", "text_column", "label_column", "encoding")
    search = SearchConfig(**{k: config[k] for k in keys if k in config} | {"pretrained": False})
    return _splits_of(task.load_data(search, task.spec_from_meta(meta)))


def _splits_of(dataset: Dataset) -> tuple[dict[str, Split], dict[str, int]]:
    """The split the best model's sections show: test when the data has one, else validation. Not both: val's
    score is the study's already, and its pass was half the report's time (1.1 s of 2.2 s on the demo, issue 14)."""
    splits = {"test": dataset.test} if dataset.test is not None else {"validation": dataset.val}
    return splits, dataset.summary()


def build_report(
    run_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    device: str = "cpu",
    tuned: LoadedModel | None = None,
    logits: Mapping[str, torch.Tensor] | None = None,
) -> StudyReport:
    """Gather everything the report shows from a run folder (study, best model, data), as data and figures.

    ``dataset``: the run's already decoded data (the search passes it); otherwise it is loaded from the path
    in ``config.yaml``, and if that is gone the best-model sections say so. ``tuned`` and ``logits``: the
    exported best model already loaded back and its logits by split name (the search scored it on test): the
    report neither loads it again nor predicts those splits again.

    >>> build_report("runs/demo").summary["best_score"]  # doctest: +SKIP
    0.97
    """
    run_dir = Path(run_dir)
    config, study = load_study(run_dir)
    best_dir = run_dir / "best"
    if tuned is None and (best_dir / export.CONFIG).is_file():
        tuned = export.load_model(best_dir, device=device)
    task = tasks.get(tuned.meta.get("task", "image")) if tuned is not None else None
    splits: dict[str, Split] = {}
    counts = None
    model_note = "No model was exported (no trial completed)."
    if tuned is not None and dataset is not None:
        splits, counts = _splits_of(dataset)
    elif tuned is not None and Path(config["data"]).exists():
        splits, counts = _load_splits(config, task, tuned.meta)
    elif tuned is not None:
        model_note = f"The data folder {config['data']} is no longer there, so the best model is not evaluated."
    report = StudyReport(summary=figures.summary_data(study, config, meta=tuned.meta if tuned else None, counts=counts))
    with warnings.catch_warnings():  # plot_timeline and friends are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _study_sections(report, study)
        if study.trials:
            report.add("Timeline", report.figure("timeline", optuna.visualization.plot_timeline(study)))
    if splits and tuned is not None:
        _model_sections(report, tuned, task, splits, logits or {})
    else:
        report.add("Best model", model_note)
    report.add("All trials", _trials_html(figures.trials_table(study)))
    return report


# ----------------------------------------------------------------------------- HTML


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1.2rem} dl.summary dt{font-weight:600}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6rem 1rem}
.mistakes{display:flex;flex-wrap:wrap;gap:1rem} .mistakes figure{margin:0;text-align:center;font-size:.85rem}
.mistakes img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc}
.mistakes blockquote.text{margin:0 0 .3rem;max-width:22rem;padding:.4rem .6rem;border:1px solid #ccc;text-align:left}
.mistakes mark{padding:0 .15rem} .mistakes mark sub{font-size:.65rem;color:#555}
table.trials{border-collapse:collapse;font-size:.85rem;width:100%}
table.trials th,table.trials td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
table.trials th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
tr.COMPLETE td:nth-child(2){color:#1a7f37} tr.PRUNED td:nth-child(2){color:#b35900} tr.FAIL td:nth-child(2){color:#c00}
"""

# Click a column header to sort by it (numbers numerically, empty cells last); click again to reverse.
_SORT_JS = """
document.querySelectorAll('table.trials th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.order !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === '') return 1; if (y === '') return -1;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _cell(value: Any) -> str:
    if value is None:
        return '<td data-v=""></td>'
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f'<td data-v="{html.escape(str(value))}">{html.escape(shown)}</td>'


def _trials_html(rows: list[dict[str, Any]]) -> _Html:
    if not rows:
        return _Html('<p class="note">The study has no trials yet.</p>')
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(c.removeprefix('param_'))}</th>" for c in columns)
    body = "".join(
        f'<tr class="{html.escape(r["state"])}">' + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows
    )
    note = "<p>Click a column header to sort.</p>"
    return _Html(f'{note}<table class="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def _summary_html(s: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str = "") -> str:
        return "—" if value is None else format(value, spec)

    counts = s["counts"]
    what = f"images at {counts['image_size']} px" if counts and "image_size" in counts else "examples"
    data_line = (
        f"{counts['classes']} classes; {counts['train']} train, {counts['val']} validation, "
        f"{counts['test']} test {what}"
        if counts
        else "not loaded"
    )
    budget = f"{s['trials']} trials" + (f" of {s['trials_budget']}" if s["trials_budget"] else "")
    budget += f" ({', '.join(f'{v} {k.lower()}' for k, v in s['states'].items())})" if s["states"] else ""
    if s["search_seconds"] is not None:
        budget += f", {s['search_seconds']:.0f} s"
    if s["timeout_s"]:
        budget += f" of a {s['timeout_s']:.0f} s timeout"
    rows = [
        ("Study", s["study_name"]),
        ("Model", f"{s['model']} ({s['weights']})"),
        ("Data", f"{s['data']}: {data_line}"),
        ("Budget used", budget),
        ("Best trial", fmt(s["best_trial"])),
        (f"Best validation {s['score_name']}", fmt(s["best_score"], ".4f")),
        (f"Test {s['score_name']}", fmt(s["test_score"], ".4f")),
        ("Best strategy", s["best_strategy"] or "—"),
    ]
    if s.get("model_selection"):
        rows.insert(2, ("Model selection", s["model_selection"].removeprefix("model selection: ")))
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rows)
    return f'<dl class="summary">{items}</dl>'


def _section_html(title: str, items: list[Any], figure_ids: dict[int, str]) -> str:
    parts = [f"<h2>{html.escape(title)}</h2>"]
    for item in items:
        if isinstance(item, go.Figure):
            parts.append(
                item.to_html(full_html=False, include_plotlyjs=False, div_id=figure_ids[id(item)], default_height=480)
            )
        elif isinstance(item, _Html):
            parts.append(item.text)
        else:
            parts.append(f'<p class="note">{html.escape(str(item))}</p>')
    return "\n".join(parts)


def render_html(report: StudyReport) -> str:
    """The report as one HTML page with Plotly's JavaScript inlined once (no network needed to open it)."""
    from plotly.offline import get_plotlyjs

    ids = {id(figure): f"figure-{name}" for name, figure in report.figures.items()}
    title = f"autoft report: {report.summary['study_name']}"
    body = "\n".join(_section_html(t, items, ids) for t, items in report.sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n<script id='plotly-js'>{get_plotlyjs()}</script></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<h2>Summary</h2>\n{_summary_html(report.summary)}\n{body}\n"
        f"<script>{_SORT_JS}</script>\n</body></html>\n"
    )


def write_report(
    run_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    device: str = "cpu",
    png: bool = False,
    tuned: LoadedModel | None = None,
    logits: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``RUN_DIR/report.html`` (and with ``png`` each figure as ``RUN_DIR/figures/NAME.png``);
    ``tuned`` and ``logits`` as in :func:`build_report`.

    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
    """
    run_dir = Path(run_dir)
    report = build_report(run_dir, dataset=dataset, device=device, tuned=tuned, logits=logits)
    path = run_dir / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(path)
    (run_dir / "report.json").write_text(json.dumps(_plain(report.summary), indent=2) + "\n")
    if png:
        write_pngs(report, run_dir / "figures")
    log.info("wrote the report %s", path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, export.Evaluation):
        return {"accuracy": value.accuracy, "per_class": value.per_class, "confusion": value.confusion}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def write_pngs(report: StudyReport, folder: Path) -> list[Path]:
    """Each figure as a PNG via Kaleido, which drives a local Chrome or Chromium (one browser for all; offline)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise AutoftError("--png needs Kaleido; install it with: pip install 'autoft[report]'.") from None
    import plotly.io

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png" for name in report.figures]
    try:
        plotly.io.write_images(list(report.figures.values()), paths, width=1000, height=600)
    except (RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutoftError(
            f"The report was written, but Kaleido could not write PNGs to {folder} ({reason}); it needs Chrome "
            "or Chromium installed (e.g. apt-get install chromium, or set BROWSER_PATH to the browser)."
        ) from None
    return paths
