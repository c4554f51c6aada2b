"""The task seam: a second task, written here against autoft.tasks.base alone, runs a real search through the
same core (spaces, study, plan, pruning, the run folder, the final model, the report, load_model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import autoft
from autoft import tasks
from autoft.errors import AutoftError
from autoft.recipe import Recipe
from autoft.tasks.base import Batch, Dataset, LoadedModel, Task, TensorSplit, batches

FEATURES = 8


class MLP(nn.Module):
    """A small MLP that follows the model protocol: body blocks, then a linear head."""

    def __init__(self, width: int, depth: int, num_classes: int = 1) -> None:
        super().__init__()
        layers, size = [], FEATURES
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(size, width), nn.ReLU()))
            size = width
        self.blocks = nn.Sequential(*layers)
        self.width = size
        self.head = nn.Linear(size, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.width, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"blocks": r"^blocks\.(\d+)"}


class VectorTask(Task):
    """Classify feature vectors stored in an .npz file (arrays ``x_train, y_train, x_val, y_val``)."""

    name = "vectors"

    def check_model(self, name: str) -> None:
        if not name.startswith("mlp-"):
            raise AutoftError(f"Unknown model {name!r}; vectors models are named mlp-WIDTHxDEPTH.")

    def create_model(self, name: str, config: autoft.SearchConfig) -> nn.Module:
        width, depth = (int(v) for v in name.removeprefix("mlp-").split("x"))
        return MLP(width, depth)

    def input_spec(self, model: nn.Module, config: autoft.SearchConfig) -> str:
        return "standardized"

    def load_data(self, config: autoft.SearchConfig, spec: str) -> Dataset:
        arrays = np.load(config.data, allow_pickle=False)  # data files never run code
        split = {name: TensorSplit(torch.from_numpy(arrays[f"x_{name}"]), torch.from_numpy(arrays[f"y_{name}"]))
                 for name in ("train", "val")}  # fmt: skip
        classes = tuple(str(c) for c in range(int(arrays["y_train"].max()) + 1))
        return Dataset(classes, split["train"], split["val"], None, Path(config.data), 0)

    def batches(self, split: TensorSplit, **options: Any) -> Iterator[Batch]:
        return batches(split, **options)

    def train_inputs(self, batch: Batch, recipe: Recipe, spec: str, *, num_classes: int, device: torch.device,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return batch[0].to(device), batch[1].to(device)

    def eval_inputs(self, inputs: torch.Tensor, spec: str, *, device: torch.device) -> torch.Tensor:
        return inputs.to(device)

    def export_meta(self, spec: str) -> dict[str, Any]:
        return {"inputs": spec}

    def spec_from_meta(self, meta: dict[str, Any]) -> str:
        return meta["inputs"]

    def load_tuned(self, directory: Path, meta: dict[str, Any], state: dict, device: torch.device) -> LoadedModel:
        model = self.create_model(meta["model"], None)  # type: ignore[arg-type]
        model.reset_classifier(meta["num_classes"])
        model.load_state_dict(state)
        return LoadedModel(model.to(device).eval(), tuple(meta["classes"]), meta, device)

    def example_html(self, split: TensorSplit, rows: list[int]) -> list[str]:
        return [f"<code>{split.images[row, :3].tolist()}</code>" for row in rows]


@pytest.fixture
def vectors(tmp_path: Path) -> Iterator[Path]:
    """Three Gaussian clusters in 8 dimensions; the task registered for the test only."""
    gen = np.random.default_rng(0)
    centres = gen.normal(0, 1.5, (3, FEATURES)).astype(np.float32)

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(3), per_class)
        return (centres[y] + gen.normal(0, 1.0, (len(y), FEATURES))).astype(np.float32), y.astype(np.int64)

    (x_train, y_train), (x_val, y_val) = draw(40), draw(15)
    path = tmp_path / "vectors.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    tasks.register("vectors", VectorTask)
    yield path
    tasks._FACTORIES.pop("vectors")
    tasks._CREATED.pop("vectors", None)


@pytest.mark.slow
def test_a_second_task_runs_a_real_search_through_the_same_core(vectors: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = autoft.search(
        "mlp-32x2", vectors, task="vectors", trials=6, max_epochs=4, run_dir=run, seed=0, keep_top=2, timeout="5m"
    )
    states = [t.state for t in result.study.trials]
    assert len(states) == 6 and TrialState.COMPLETE in states
    strategies = {t.user_attrs["knobs"]["freeze"] for t in result.study.trials}
    assert {"linear_probe", "full"} <= strategies  # the portfolio ran: head-only (feature cache) and full
    assert result.best_score > 0.7  # the clusters are separable: a real search learns them
    meta = json.loads((run / "best" / "config.json").read_text())
    assert meta["task"] == "vectors" and meta["inputs"] == "standardized" and meta["classes"] == ["0", "1", "2"]
    loaded = autoft.load_model(run / "best")
    assert isinstance(loaded.model, MLP) and loaded.classes == ("0", "1", "2")
    plan = result.study.user_attrs["plan"]
    assert plan["data"]["train"] == 120 and plan["data"]["image_size"] == 0  # the plan probed the vectors
    report = (run / "report.html").read_text()
    assert "Most confidently wrong on validation" in report and "<code>" in report  # the task's own examples


def test_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(AutoftError, match=r"Unknown task 'imag'\. Did you mean 'image'"):
        tasks.get("imag")
