"""Every --sampler and --pruner runs a tiny real search (real SQLite study, real tiny timm model)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autoft
from autoft.config import PRUNERS, SAMPLERS
from autoft.space import Param, SearchSpace
from autoft.study import create_pruner, create_sampler
from conftest import make_image_folder

# Two continuous knobs (so GP, CMA-ES and QMC model something after the 3 startup trials), cheap trials.
TINY_SPACE = SearchSpace(
    [
        Param("freeze", "fixed", value="partial"),
        Param("train_blocks", "fixed", value=1),
        Param("lr", "float", low=1e-4, high=1e-1, log=True),
        Param("weight_decay", "float", low=0.0, high=0.1),
        Param("epochs", "fixed", value=2),
        Param("batch_size", "fixed", value=32),
        Param("augment", "fixed", value="none"),
    ]
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "data", per_class=8, size=(16, 16), noise=90)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_an_optuna_sampler(name: str) -> None:
    assert isinstance(create_sampler(name, seed=0, trials=8), optuna.samplers.BaseSampler)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_is_an_optuna_pruner(name: str) -> None:
    assert isinstance(create_pruner(name, max_epochs=5), optuna.pruners.BasePruner)


def test_unknown_sampler_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(autoft.AutoftError, match=r"--sampler 'bo' is not known; choose one of: tpe, gp"):
        autoft.search("test_resnet", tmp_path, sampler="bo")


# Each sampler paired with one pruner, so five tiny searches run all five samplers and all five pruners.
@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "pruner"), list(zip(SAMPLERS, PRUNERS, strict=True)))
def test_tiny_search_with_each_sampler_and_pruner(data: Path, tmp_path: Path, sampler: str, pruner: str) -> None:
    result = autoft.search(
        "test_resnet",
        data,
        trials=4,
        space=TINY_SPACE,
        sampler=sampler,
        pruner=pruner,
        run_dir=tmp_path / "run",
        pretrained=False,
        image_size=16,
        max_epochs=2,
    )
    trials = result.study.trials
    assert len(trials) == 4 and not [t for t in trials if t.state == TrialState.FAIL]
    assert type(result.study.sampler) is type(create_sampler(sampler, seed=0, trials=4))
    assert type(result.study.pruner) is type(create_pruner(pruner, max_epochs=2))
    assert len({t.params["lr"] for t in trials}) == 4  # the sampler chose each trial's rate (3 startup + 1 own)
    assert 0.0 <= result.best_score <= 1.0 and result.model_dir.is_dir()
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # epoch-level reports reached the pruner
