"""autoft: give it a pretrained timm model and a folder of labelled images; get back the best fine-tuned model.

>>> import autoft
>>> result = autoft.search(model="resnet50", data="./data", trials=20)  # doctest: +SKIP
>>> autoft.load_model(result.model_dir).predict(["cat.jpg"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autoft import _started  # noqa: F401  (first: the clock of the command's --timeout starts here)
from autoft.config import SearchConfig, parse_duration
from autoft.controller import Progress, SearchInterrupted, SearchResult, run_search
from autoft.errors import AutoftError
from autoft.export import TunedModel, load_model
from autoft.pieces import register_freeze, register_optimizer
from autoft.recipe import BASELINE, Recipe
from autoft.space import Param, SearchSpace, load_space

__all__ = [
    "BASELINE",
    "AutoftError",
    "Param",
    "Progress",
    "Recipe",
    "SearchConfig",
    "SearchInterrupted",
    "SearchResult",
    "SearchSpace",
    "TunedModel",
    "load_model",
    "load_space",
    "register_freeze",
    "register_optimizer",
    "search",
]
__version__ = "0.1.0"


def search(
    model: str | Sequence[str],
    data: str | Path,
    *,
    trials: int | None = 20,
    timeout: str | float | None = None,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> SearchResult:
    """Search fine-tuning strategies for ``model`` on the image folder ``data``; export the best model.

    ``model`` is a timm name, or several (``"a,b"`` or a list): the weak ones are dropped first (model
    selection; ``model_selection=False`` turns it off) and the search chooses among the rest.
    ``options`` are the other :class:`SearchConfig` fields (``weights``, ``max_epochs``, ``seed``, ...), e.g.
    ``objectives="accuracy,params"`` (a Pareto front; ``result.pareto``) or ``warm_start_from="runs/earlier"``.
    ``space`` may be a preset name, a YAML path, a :class:`SearchSpace`, or a function ``space(trial) -> dict``.

    >>> result = search("efficientnet_lite0", "./data", trials=10, timeout="15m")  # doctest: +SKIP
    >>> result.best_score, result.model_dir  # doctest: +SKIP
    (0.97, PosixPath('runs/efficientnet_lite0-data/best'))
    """
    config = SearchConfig(model=model, data=Path(data), trials=trials, timeout=parse_duration(timeout), **options)
    return run_search(config, progress=progress)
