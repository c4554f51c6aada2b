"""The report's figures, built as Optuna's own plots are: plain data first (dicts and lists that tests check),
figures second. A study with one trial, only failed trials or no learning curves still gives data; the
report says why a figure is missing.
"""

from __future__ import annotations

from typing import Any

import optuna
import plotly.graph_objects as go
import torch
from optuna.search_space import intersection_search_space
from optuna.trial import TrialState

from autoft import export, objectives, results, selection, tasks
from autoft.errors import AutoftError
from autoft.recipe import describe_knobs

__all__ = [
    "MISTAKES_SHOWN",
    "confident_mistakes",
    "confusion_figure",
    "curves_data",
    "curves_figure",
    "history_data",
    "history_figure",
    "importance_data",
    "importance_figure",
    "pareto_data",
    "pareto_figure",
    "per_class_figure",
    "summary_data",
    "trials_table",
]

MISTAKES_SHOWN = 12


def _strategy(params: dict[str, Any]) -> str:
    try:
        return describe_knobs(params)
    except AutoftError:  # a failed trial may hold parameters that are no recipe (that is why it failed)
        return ""


def summary_data(
    study: optuna.Study, config: dict[str, Any], *, meta: dict[str, Any] | None, counts: dict[str, int] | None
) -> dict[str, Any]:
    """The headline numbers: data counts, model, budget used, best and test score, the best strategy in words."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    trained = results.trained_trials(study)  # seeded by --warm-start: a score without a model, never the best
    if len(study.directions) == 1:
        best = results.best_trial(study, ("accuracy",))[0] if trained else None
    else:  # several objectives: the summary names the knee that best/ holds (none when nothing was exported)
        best = next((t for t in trained if meta and t.number == meta.get("trial")), None)
    return {
        "study_name": study.study_name,
        "model": config.get("model"),
        "weights": config.get("weights") or ("pretrained" if config.get("pretrained", True) else "from scratch"),
        "data": config.get("data"),
        "counts": counts,
        "classes": (meta or {}).get("classes"),
        "trials": len(trials),
        "trials_budget": config.get("trials"),
        "timeout_s": config.get("timeout"),
        "states": {k: v for k, v in states.items() if v},
        "search_seconds": round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None,
        "best_trial": best.number if best else None,
        "best_score": best.values[0] if best else None,
        "best_strategy": _strategy(results.knobs(best)) if best else None,
        "model_selection": selection.summary_line(study),  # several models: which were dropped, and why
        "test_score": (meta or {}).get("test_accuracy"),
        "score_name": tasks.score_name(config.get("task")),  # what best_score and test_score measure
    }


def history_data(study: optuna.Study) -> dict[str, list]:
    """Scores of COMPLETE trials in order, and the best so far after each (what the history plot shows)."""
    numbers, values, best = [], [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        numbers.append(t.number)
        values.append(t.value)
        best.append(max(values))
    return {"numbers": numbers, "values": values, "best_so_far": best}


def curves_data(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial's learning curve (validation accuracy per epoch) with its state and planned epochs.

    Multi-objective trials keep the curve in the user attr ``val_accuracy`` (Optuna takes no intermediate values).
    """
    curves = []
    for t in study.get_trials(deepcopy=False):
        values = [t.intermediate_values[e] for e in sorted(t.intermediate_values)] or t.user_attrs.get("val_accuracy")
        if values:
            epochs = sorted(t.intermediate_values) or list(range(len(values)))
            planned = results.knobs(t).get("epochs")
            curves.append({"number": t.number, "state": t.state.name, "epochs": epochs, "values": values})
            curves[-1]["planned_epochs"] = planned
    return curves


def pareto_data(study: optuna.Study, *, best_trial: int | None) -> dict[str, Any]:
    """The objectives' names and the front of the trials this study trained, with the knee (best/) marked."""
    names = objectives.study_objectives(study)
    if len(names) != len(study.directions):  # a study autoft did not open: name the values by position
        names = tuple(f"objective {i}" for i in range(len(study.directions)))
    labels = [objectives.OBJECTIVES[n].label if n in objectives.OBJECTIVES else n for n in names]
    points = [objectives.ParetoPoint(t.number, tuple(t.values)) for t in results.trained_trials(study)]
    front = objectives.pareto_front(points, names) if all(n in objectives.OBJECTIVES for n in names) else []
    return {
        "labels": labels,
        "front": [{"trial": p.trial, "values": list(p.values)} for p in front],
        "best_trial": best_trial,
    }


def pareto_figure(study: optuna.Study, pareto: dict[str, Any]) -> go.Figure:
    """Optuna's Pareto-front plot, with best/ (the knee) marked by a star when there are two or three objectives."""
    figure = optuna.visualization.plot_pareto_front(study, target_names=pareto["labels"])
    knee = next((p["values"] for p in pareto["front"] if p["trial"] == pareto["best_trial"]), None)
    marker = {"symbol": "star" if len(pareto["labels"]) == 2 else "diamond", "size": 16, "color": "crimson"}
    if knee is not None and len(knee) == 2:
        figure.add_trace(go.Scatter(x=[knee[0]], y=[knee[1]], mode="markers", marker=marker, name="best/ (knee)"))
    elif knee is not None and len(knee) == 3:
        figure.add_trace(
            go.Scatter3d(x=[knee[0]], y=[knee[1]], z=[knee[2]], mode="markers", marker=marker, name="best/ (knee)")
        )
    return figure


# What importance_data imports: optuna.importance loads scikit-learn and scipy.stats, 3.6 s on 2 cores (2026-12-04,
# scikit-learn 1.9, scipy 1.17; 1.4 s with older ones). Imported in the wrap-up it overran a 30 s budget by 3 s (its
# reserve is 2 s on an idle machine), so the controller preloads it while the trials train.
IMPORTANCE_MODULES = ("optuna.importance",)
# What importing them writes to the environment (scikit-learn's __init__, 1.9), set before they load in a thread:
# autoft.preload says why. tests/test_preload.py checks that the import writes nothing else.
IMPORTANCE_ENVIRONMENT = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}


def importance_data(study: optuna.Study) -> tuple[dict[str, float], str]:
    """fANOVA importances of the parameters every COMPLETE trial shares, most important first, or a reason why not.

    >>> importance_data(study)  # doctest: +SKIP
    ({'lr': 0.61, 'freeze': 0.25, ...}, '')
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1:
        return {}, "Parameter importances are shown for single-objective studies only."
    if len(complete) < 2:
        return {}, f"Parameter importances need at least 2 complete trials; this study has {len(complete)}."
    if len({t.value for t in complete}) == 1:
        return {}, "Parameter importances need scores that differ; every complete trial scored the same."
    space = intersection_search_space(complete)
    varied = [p for p in space if len({repr(t.params[p]) for t in complete}) > 1]
    if not varied:
        return {}, "Parameter importances need parameters that vary between complete trials; none did."
    # Imported here, not at the top: a search whose report has no importances to show never needs it. A search
    # preloads it once a second trial completes (IMPORTANCE_MODULES).
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    importances = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=varied)
    return dict(importances), ""


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as one row (state, value, epochs, seconds, strategy, parameters), in trial order."""
    return [results.trial_row(t) | {"strategy": _strategy(results.knobs(t))} for t in study.get_trials(deepcopy=False)]


def confident_mistakes(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], *, top: int = MISTAKES_SHOWN
) -> list[dict[str, Any]]:
    """The wrongly classified images the model was surest of, surest first: index, true, predicted, confidence."""
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[confidence[wrong].argsort(descending=True, stable=True)][:top]
    return [
        {
            "index": i,
            "true": classes[labels[i]],
            "predicted": classes[predicted[i]],
            "confidence": round(confidence[i].item(), 4),
        }
        for i in order.tolist()
    ]


# ----------------------------------------------------------------------------- figures


def history_figure(study: optuna.Study, *, score_name: str = "accuracy") -> go.Figure:
    return optuna.visualization.plot_optimization_history(study, target_name=f"validation {score_name}")


def curves_figure(curves: list[dict[str, Any]], *, score_name: str = "accuracy") -> go.Figure:
    """Learning curves; pruned trials dashed, in orange, ending in a cross where they were stopped."""
    colours = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}
    figure = go.Figure()
    for c in curves:
        pruned = c["state"] == "PRUNED"
        figure.add_trace(
            go.Scatter(
                x=[e + 1 for e in c["epochs"]],
                y=c["values"],
                mode="lines+markers",
                name=f"trial {c['number']} ({c['state'].lower()})",
                line={"color": colours.get(c["state"], "#7f7f7f"), "dash": "dash" if pruned else "solid"},
                marker={
                    "symbol": ["circle"] * (len(c["epochs"]) - 1) + ["x" if pruned else "circle"],
                    "size": [6] * (len(c["epochs"]) - 1) + [12 if pruned else 6],
                },
            )
        )
    figure.update_layout(
        title=f"Learning curves (validation {score_name} per epoch; pruned trials dashed, stopped at the cross)",
        xaxis={"title": "epoch", "dtick": 1},
        yaxis_title=f"validation {score_name}",
    )
    return figure


def importance_figure(importances: dict[str, float]) -> go.Figure:
    names = list(importances)[::-1]
    figure = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    figure.update_layout(title="Parameter importances (fANOVA)", xaxis_title="importance")
    return figure


def confusion_figure(evaluation: export.Evaluation, split: str) -> go.Figure:
    figure = go.Figure(
        go.Heatmap(
            z=evaluation.confusion,
            x=list(evaluation.classes),
            y=list(evaluation.classes),
            colorscale="Blues",
            text=evaluation.confusion,
            texttemplate="%{text}",
        )
    )
    figure.update_layout(
        title=f"Confusion matrix on {split} (accuracy {evaluation.accuracy:.4f}, {evaluation.count} images)",
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis={"autorange": "reversed"},
    )
    return figure


def per_class_figure(evaluation: export.Evaluation, split: str) -> go.Figure:
    names = [n for n, v in evaluation.per_class.items() if v is not None]
    figure = go.Figure(go.Bar(x=names, y=[evaluation.per_class[n] for n in names]))
    figure.update_layout(title=f"Per-class accuracy on {split}", yaxis={"range": [0, 1], "title": "accuracy"})
    return figure
