"""The final model: the best single trial, a greedy "soup" of the kept top trials, or a refit on train+val.

After the search, ``best/`` holds the best single trial (the executor keeps it there while trials run).
:func:`make_final_model` then decides what ``best/`` should finally hold:

- ``--refit``: the best trial's recipe trained once more on train+val, for as many epochs as the best trial's
  best epoch count, with the best trial's seed. Val can no longer judge it (it trained on it); the test split
  still scores it.
- otherwise a greedy soup (Wortsman et al. 2022, "Model soups"): the kept models (``best/`` plus ``top/``
  from ``--keep-top K``) of the best trial's architecture, best val accuracy first; each next one joins when
  the uniform weight average's val accuracy does not drop. The soup replaces the single best only when its
  val accuracy is strictly higher. It costs at most K val evaluations and no extra disk: the candidates are
  the models ``--keep-top`` keeps anyway, so a resumed search finds them again (both backends write them).
- else the best single trial stays.

When ``best/`` gets a soup or a refit, the single best trial's model moves to ``top/trial-N`` and
:func:`restore_single` puts it back when the search resumes, so new trials are compared with a real trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from autoft import export
from autoft.config import SearchConfig
from autoft.features import FeatureCache
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.tasks.base import Dataset, Task
from autoft.trial import evaluate, run_trial

__all__ = ["FinalModel", "average_states", "greedy_soup", "make_final_model", "refit_dataset", "restore_single"]

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinalModel:
    """Which model ``best/`` holds and why.

    ``kind``: "single", "soup" or "refit"; ``trials``: its trials (the soup's members, best first);
    ``val_accuracy``: the final model's (None for a refit: it trained on val); ``single_val_accuracy``: the
    best single trial's, measured the same way.

    >>> FinalModel("soup", (3, 1), 0.9, 0.85, "it beats the best single trial").describe()
    'soup of trials [3, 1]'
    """

    kind: str
    trials: tuple[int, ...]
    val_accuracy: float | None
    single_val_accuracy: float | None
    reason: str

    def describe(self) -> str:
        """The final model in words: "single trial 3", "soup of trials [3, 1]", "refit of trial 3 on train+val"."""
        if self.kind == "soup":
            return f"soup of trials {list(self.trials)}"
        if self.kind == "refit":
            return f"refit of trial {self.trials[0]} on train+val"
        return f"single trial {self.trials[0]}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"trials": list(self.trials), "description": self.describe()}


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """The uniform average of state dicts: floating tensors averaged (in float64, then the original dtype),
    integer buffers such as BatchNorm's ``num_batches_tracked`` taken from the first (the best).

    >>> average_states([{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}])["w"]
    tensor([1.5000])
    """
    first = states[0]
    return {
        key: torch.stack([s[key].double() for s in states]).mean(0).to(value.dtype)
        if value.is_floating_point()
        else value.clone()
        for key, value in first.items()
    }


def greedy_soup(
    states: Sequence[Callable[[], State]], score: Callable[[State], float]
) -> tuple[list[int], float, State, float]:
    """Greedy soup over candidates ordered best first: each joins when the average's score does not drop.

    ``states`` load the candidates' weights on demand (one at a time beyond the accepted ones). Returns the
    indices of the members, the soup's score, its weights, and the first candidate's own score.

    >>> greedy_soup([lambda: {"w": torch.tensor([1.0])}], lambda s: 1.0)[0]
    [0]
    """
    accepted = [states[0]()]
    single_score = soup_score = score(accepted[0])
    soup, members = accepted[0], [0]
    for index, load in enumerate(states[1:], start=1):
        candidate = load()
        mixed = average_states([*accepted, candidate])
        mixed_score = score(mixed)
        log.info("soup: with candidate %d the val accuracy is %.4f (soup so far %.4f)", index, mixed_score, soup_score)
        if mixed_score >= soup_score:  # the paper's rule: keep an ingredient unless it lowers the held-out score
            accepted.append(candidate)
            soup, soup_score = mixed, mixed_score
            members.append(index)
    return members, soup_score, soup, single_score


def refit_dataset(dataset: Dataset, task: Task) -> Dataset:
    """The data set with val folded into train (the examples as read, joined by the task: nothing is read again).

    >>> len(refit_dataset(ds, task).train) == len(ds.train) + len(ds.val)  # doctest: +SKIP
    True
    """
    return dataclasses.replace(dataset, train=task.merged(dataset.train, dataset.val))


def restore_single(best_dir: Path, top_dir: Path) -> None:
    """Before a search continues: put the best single trial back into ``best/`` if a soup or refit replaced it."""
    meta = _meta(best_dir)
    if meta is None or _kind(meta) == "single":
        return
    kept = top_dir / f"trial-{meta['trial']:04d}"
    if not (kept / export.CONFIG).is_file():
        log.warning(
            "%s holds a %s but trial %d's own model is gone from %s", best_dir, meta["final"], meta["trial"], kept
        )
        return
    _swap_in(kept, best_dir)
    log.info("resuming: best/ holds trial %d again (the final model is made again after the search)", meta["trial"])


def make_final_model(cfg: SearchConfig, setup: Setup, best_dir: Path) -> FinalModel | None:
    """Decide what ``best/`` finally holds (refit, soup or the single best trial), write it there, say why.

    None when ``best/`` holds no model (deleted by hand): there is nothing to decide.

    >>> make_final_model(cfg, setup, cfg.run_dir / "best").describe()  # doctest: +SKIP
    'soup of trials [4, 2]'
    """
    top_dir = best_dir.parent / "top"
    meta = _meta(best_dir)
    if meta is None:
        return None
    if _kind(meta) != "single":  # restore_single found no single trial to put back: keep what is there
        recorded = {k: v for k, v in meta["final"].items() if k != "description"}
        return FinalModel(**recorded | {"trials": tuple(recorded["trials"])})
    single = meta["val_accuracy"]
    if cfg.refit:
        return _refit(cfg, setup, best_dir, top_dir, meta)
    if not cfg.soup:
        return _record(best_dir, FinalModel("single", (meta["trial"],), single, single, "the soup is off (--no-soup)"))
    return _soup(setup, best_dir, top_dir, meta)


def _soup(setup: Setup, best_dir: Path, top_dir: Path, meta: dict[str, Any]) -> FinalModel:
    trial, single = meta["trial"], meta["val_accuracy"]
    candidates = _candidates(best_dir, top_dir, meta["model"])
    if len(candidates) < 2:
        why = "a soup needs at least 2 kept models of one architecture (--keep-top K >= 2 keeps K)"
        return _record(best_dir, FinalModel("single", (trial,), single, single, why))
    tuned = export.load_model(best_dir, device=str(setup.device))

    def score(state: State) -> float:
        tuned.model.load_state_dict(state)
        return evaluate(tuned.model, setup.dataset.val, setup)[1]

    loaders = [lambda folder=folder: load_file(str(folder / export.WEIGHTS)) for _, folder in candidates]
    members, soup_score, soup, single_score = greedy_soup(loaders, score)
    numbers = tuple(candidates[i][0] for i in members)
    if len(members) > 1 and soup_score > single_score:
        why = f"its val accuracy {soup_score:.4f} beats the best single trial's {single_score:.4f}"
        final = FinalModel("soup", numbers, soup_score, single_score, why)
        _replace_best(best_dir, top_dir, soup, meta | {"val_accuracy": soup_score, "final": final.to_dict()})
        return final
    if len(members) > 1:
        why = f"the soup of trials {list(numbers)} scored val {soup_score:.4f}, not above its {single_score:.4f}"
    else:
        why = f"no other of the {len(candidates)} kept models could join it without lowering val accuracy"
    return _record(best_dir, FinalModel("single", (trial,), single, single_score, why))


def _refit(cfg: SearchConfig, setup: Setup, best_dir: Path, top_dir: Path, meta: dict[str, Any]) -> FinalModel:
    trial, single = meta["trial"], meta["val_accuracy"]
    recipe = dataclasses.replace(Recipe.from_params(meta["params"]), epochs=meta["best_epoch"] + 1)
    dataset = refit_dataset(setup.dataset, setup.task)
    log.info(
        "refit: trial %d's recipe for %d epochs on %d train+val examples", trial, recipe.epochs, len(dataset.train)
    )
    features = FeatureCache(setup.base_model, dataset, setup.task, setup.spec, device=setup.device)
    refit = dataclasses.replace(setup, dataset=dataset, feature_cache=features, prefix_cache=None)
    outcome = run_trial(refit, recipe, seed=cfg.seed + trial, keep_last=True)  # the best trial's seed; no
    # held-out split is left to choose an epoch by, so the last epoch's weights are kept
    if outcome.diverged or not outcome.best_state:
        why = f"the refit on train+val failed ({outcome.diverged or 'no epoch finished'})"
        return _record(best_dir, FinalModel("single", (trial,), single, single, why))
    why = (
        f"--refit: trained on train+val ({len(dataset.train)} examples) for {recipe.epochs} epochs; "
        "val cannot judge it (it trained on val): the test split scores it"
    )
    final = FinalModel("refit", (trial,), None, single, why)
    refit_meta = meta | {
        "params": meta["params"] | {"epochs": recipe.epochs},
        "strategy": recipe.describe(),
        "val_accuracy": None,
        "best_epoch": recipe.epochs - 1,
        "train_images": len(dataset.train),
        "final": final.to_dict(),
    }
    _replace_best(best_dir, top_dir, outcome.best_state, refit_meta)
    return final


def _kind(meta: dict[str, Any]) -> str:
    return (meta.get("final") or {}).get("kind", "single")


def _meta(directory: Path) -> dict[str, Any] | None:
    path = directory / export.CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def _candidates(best_dir: Path, top_dir: Path, model: str) -> list[tuple[int, Path]]:
    """The kept models of ``model`` (the architecture and initialization the best trial shares), best first."""
    folders = [best_dir, *sorted(top_dir.glob("trial-*"))]
    found = [
        (meta, folder)
        for folder in folders
        if (meta := _meta(folder)) is not None and meta["model"] == model and _kind(meta) == "single"
    ]
    found.sort(key=lambda item: (-item[0]["val_accuracy"], item[0]["trial"]))
    return [(meta["trial"], folder) for meta, folder in found]


def _record(best_dir: Path, final: FinalModel) -> FinalModel:
    """``best/`` stays the single best trial: say so in its config.json."""
    export.update_config(best_dir, final=final.to_dict())
    return final


def _replace_best(best_dir: Path, top_dir: Path, state: State, meta: dict[str, Any]) -> None:
    """Move the single best trial's model to ``top/trial-N`` and write the final model into ``best/`` whole."""
    kept = top_dir / f"trial-{meta['trial']:04d}"
    if not kept.exists():
        shutil.copytree(best_dir, kept)
    staged = best_dir.with_name(f".{best_dir.name}.final-{os.getpid()}")
    export.save_model(staged, state, meta)
    _swap_in(staged, best_dir)


def _swap_in(source: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``source`` (a rename each: ``target`` is never half written)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old)
