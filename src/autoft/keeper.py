"""The run folder's keeper: ``best/``, ``top/`` and ``pareto/``, and the one place that decides what "best" is.

Trials are kept as they end, in the driver only (one at a time, whichever backend ran them), so concurrent
trials never race for ``best/``:

- one objective: ``best/`` holds the most accurate COMPLETE trial (ties: the earlier trial; the rule is
  ``results.best_trial``, which the summary and the report read too); with
  ``--keep-top K`` the next K-1 go to ``top/trial-N`` (the rest are deleted: no checkpoint bloat);
- several objectives: ``pareto/trial-N`` holds every trial on the Pareto front (those that fall off are
  deleted) and ``best/`` its knee (``objectives.KNEE_RULE``).

Trials seeded by ``--warm-start`` have no model: they never count. Files are written under a temporary name
and renamed (``export.save_model``), so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import optuna
from torch import nn

from autoft import adapters, export, objectives, results
from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.objectives import ParetoPoint
from autoft.preparation import Setup
from autoft.recipe import Recipe
from autoft.runner import setup_for
from autoft.trial import TrialOutcome

__all__ = ["RunFolder", "check_free_space", "check_run_dir", "exported_setup"]

log = logging.getLogger(__name__)


class RunFolder:
    """Exports trials into the run folder as they end: ``keep(number, params, outcome)``."""

    def __init__(self, config: SearchConfig, setups: dict[str, Setup], study: optuna.Study):
        self.config, self.setups, self.study = config, setups, study
        self.model_dir, self.top_dir, self.pareto_dir = (config.run_dir / name for name in ("best", "top", "pareto"))
        self.best_score = max((t.values[0] for t in results.trained_trials(study)), default=-float("inf"))
        self._hashes: dict[int, str] = {}

    @property
    def best(self) -> float | None:
        """The best val score kept so far (None before any)."""
        return None if self.best_score == -float("inf") else self.best_score

    def keep(self, number: int, params: dict, outcome: TrialOutcome) -> None:
        """Export the trial's best weights if it ran to its end and belongs in ``best/``, ``top/`` or ``pareto/``."""
        if "oom_retry_batch_size" in outcome.notes:  # it trained at half the batch size: export what it trained with
            params = params | {"batch_size": outcome.notes["oom_retry_batch_size"]}
        if outcome.stopped_early:
            return
        if len(self.config.objectives) > 1:
            self._keep_front(number, params, outcome)
            return
        keep_more = self.config.keep_top > 1
        if outcome.best_score > self.best_score:
            if keep_more and (self.model_dir / export.CONFIG).is_file():  # the old best becomes a runner-up
                old = json.loads((self.model_dir / export.CONFIG).read_text())["trial"]
                shutil.copytree(self.model_dir, self.top_dir / f"trial-{old:04d}", dirs_exist_ok=True)
            self.best_score = outcome.best_score
            self._export(self.model_dir, number, params, outcome)
        elif keep_more:
            self._export(self.top_dir / f"trial-{number:04d}", number, params, outcome)
        if keep_more:
            self._drop_beyond_top()

    def _keep_front(self, number: int, params: dict, outcome: TrialOutcome) -> None:
        """Export the trial if it is on the Pareto front, delete models that fell off it, copy the knee to best/."""
        names = self.config.objectives
        values = tuple(objectives.trial_values(names, outcome.best_score, outcome.notes))
        others = [ParetoPoint(t.number, tuple(t.values)) for t in results.trained_trials(self.study)]
        front = objectives.pareto_front([p for p in others if p.trial != number] + [ParetoPoint(number, values)], names)
        on_front = {p.trial for p in front}
        self.best_score = max(self.best_score, outcome.best_score)
        if number in on_front:
            folder = self.pareto_dir / f"trial-{number:04d}"
            self._export(folder, number, params, outcome)
            export.update_config(folder, objectives=dict(zip(names, values, strict=True)))
        for folder in self.pareto_dir.glob("trial-*"):
            if int(folder.name.removeprefix("trial-")) not in on_front:
                shutil.rmtree(folder)
        knee = objectives.knee(front, names)
        source = self.pareto_dir / f"trial-{knee.trial:04d}"
        if (source / export.CONFIG).is_file() and _exported_trial(self.model_dir) != knee.trial:
            _copy_model(source, self.model_dir)
            log.info("best/ is now trial %d, the knee of a %d-trial Pareto front", knee.trial, len(front))

    def _drop_beyond_top(self) -> None:
        """Keep ``best/`` and the next ``keep_top - 1`` models in ``top/``; delete the rest (no checkpoint bloat)."""
        kept = []
        for folder in sorted(self.top_dir.glob("trial-*")):
            meta = json.loads((folder / export.CONFIG).read_text())
            kept.append((-meta["val_accuracy"], meta["trial"], folder))
        for _, _, folder in sorted(kept)[self.config.keep_top - 1 :]:
            shutil.rmtree(folder)

    def _export(self, directory: Path, number: int, params: dict, outcome: TrialOutcome) -> None:
        setup = setup_for(self.setups, params)
        meta = {"model": params.get("model", self.config.model)} | setup.export_meta()
        meta |= {
            "trial": number,
            "params": params,
            "strategy": Recipe.from_params(params).describe(),
            "val_accuracy": outcome.best_score,
            "best_epoch": outcome.best_epoch,
            "study_name": self.config.study_name,
        }
        adapter = None
        if self.config.export_adapter and outcome.adapter_state:
            adapter = (outcome.adapter_state, self._adapter_meta(setup, meta))
        export.save_model(directory, outcome.best_state, meta, adapter=adapter)
        log.info("trial %d (val accuracy %.4f) saved to %s", number, outcome.best_score, directory)

    def _adapter_meta(self, setup: Setup, meta: dict) -> dict[str, str]:
        """What an adapter file needs to be applied again: the base model's name and weights, the recipe."""
        if id(setup.base_model) not in self._hashes:  # hashing the weights reads them all: once per model
            self._hashes[id(setup.base_model)] = adapters.weights_hash(setup.base_model)
        recipe = Recipe.from_params(meta["params"])
        return {
            "base_model": str(meta["model"]),
            "base_weights_sha256": self._hashes[id(setup.base_model)],
            "freeze": recipe.freeze,
            "strategy": meta["strategy"],
            "lora": json.dumps(
                {k: getattr(recipe, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
                | {"target_modules": adapters.lora_targets(setup.base_model, recipe)}
            )
            if adapters.is_lora(recipe)
            else "",
        }


def exported_setup(setups: dict[str, Setup], model_dir: Path) -> Setup:
    """The setup of the model exported in ``model_dir`` (the first one when nothing is exported yet)."""
    config = model_dir / export.CONFIG
    exported = json.loads(config.read_text()).get("model") if config.is_file() else None
    return setups.get(exported) or next(iter(setups.values()))


def _exported_trial(directory: Path) -> int | None:
    """The trial whose model is in ``directory``, or None when there is none."""
    config = directory / export.CONFIG
    return json.loads(config.read_text())["trial"] if config.is_file() else None


def _copy_model(source: Path, target: Path) -> None:
    """Copy an exported model's files over another's, each written under a temporary name and renamed."""
    target.mkdir(parents=True, exist_ok=True)
    if not (source / export.ADAPTER).is_file():  # no adapter left over from the model it replaces
        (target / export.ADAPTER).unlink(missing_ok=True)
    for file in source.iterdir():
        partial = target / f".{file.name}.partial"
        shutil.copy2(file, partial)
        os.replace(partial, target / file.name)


def check_run_dir(run_dir: Path) -> None:
    """Fail before any training if results could not be written: create the folder and write a probe file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoftError(
            f"Cannot create run directory {run_dir} ({exc.strerror}); choose another with --run-dir."
        ) from None
    probe = run_dir / ".autoft-write-probe"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise AutoftError(
            f"Run directory {run_dir} is not writable ({exc.strerror}); choose another with --run-dir."
        ) from None


def check_free_space(run_dir: Path, model: nn.Module) -> None:
    """Fail before any training if the disk cannot hold the exported model (two copies: write, then rename)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = 2 * weights + (16 << 20)  # + room for the study, logs and trials.csv
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise AutoftError(
            f"Not enough free disk space in {run_dir}: {free / 2**20:.0f} MiB free, but saving the best model "
            f"needs about {need / 2**20:.0f} MiB; free some space or choose another --run-dir."
        )
