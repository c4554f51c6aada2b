"""The final model: greedy soup of the kept trials (used only when it beats the best single trial on val)
and refit on train+val, with real tiny timm models, real evaluation and real searches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import autoft
from autoft import export, final
from autoft.cli import main
from autoft.config import SearchConfig
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.trial import evaluate, run_trial
from conftest import make_image_folder

TINY = {"pretrained": False, "image_size": 16, "max_epochs": 3, "warm_start": False}


def test_average_states_is_the_exact_mean_with_integer_buffers_from_the_first() -> None:
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(), "n": torch.tensor(i + 7)}
        for i in range(3)
    ]
    soup = final.average_states(states)
    for key in ("w", "h"):
        expected = ((states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3).to(
            states[0][key].dtype
        )
        assert soup[key].dtype == states[0][key].dtype and torch.equal(soup[key], expected)
    assert soup["n"].item() == 7  # BatchNorm's num_batches_tracked: the best member's, not an average


def test_greedy_soup_adds_an_ingredient_only_when_the_score_does_not_drop() -> None:
    target = torch.tensor([1.0, 1.0])
    score = lambda state: -float((state["w"] - target).abs().sum())  # noqa: E731
    ws = [[1.5, 1.0], [9.0, 9.0], [0.5, 1.0], [1.0, 1.0]]  # best first by their own recorded score
    loaders = [lambda w=w: {"w": torch.tensor(w)} for w in ws]
    members, soup_score, soup, single = final.greedy_soup(loaders, score)
    assert members == [0, 2, 3]  # [9, 9] would pull the average away; [0.5, 1] and [1, 1] pull it closer
    assert torch.equal(soup["w"], torch.tensor([1.0, 1.0])) and soup_score == 0.0 and single == -0.5


# ----------------------------------------------------------------------------- a real situation


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    data = make_image_folder(tmp_path_factory.mktemp("final") / "data", per_class=16, size=(16, 16), noise=60)
    return prepare(SearchConfig(model="test_resnet", data=data, pretrained=False, image_size=16, device="cpu"))


@pytest.fixture(scope="module")
def trained(setup: Setup) -> tuple[Setup, dict[str, torch.Tensor]]:
    """A tiny model trained (linear probe, cached features: fast) to full val accuracy on color-coded classes."""
    recipe = Recipe(freeze="linear_probe", epochs=4, lr=3e-2, batch_size=16, augment="none")
    return setup, run_trial(setup, recipe, seed=0).best_state


def _val_accuracy(setup: Setup, state: dict[str, torch.Tensor]) -> float:
    setup.base_model.load_state_dict(state)
    return evaluate(setup.base_model, setup.dataset.val, setup)[1]


def _save_trial(folder: Path, setup: Setup, trial: int, state: dict[str, torch.Tensor], score: float) -> None:
    meta = {
        "model": "test_resnet",
        "num_classes": 3,
        "classes": list(setup.dataset.classes),
        "image_size": 16,
        "mean": list(setup.spec.mean),
        "std": list(setup.spec.std),
        "interpolation": setup.spec.interpolation,
        "trial": trial,
        "params": {"freeze": "linear_probe", "epochs": 4},
        "val_accuracy": score,
        "best_epoch": 3,
    }
    export.save_model(folder, state, meta)


def _shifted(good: dict[str, torch.Tensor], shift: float) -> dict[str, torch.Tensor]:
    """The model with class 0's bias moved by ``shift``: +1000 always predicts class 0, -1000 never does."""
    return good | {"fc.bias": good["fc.bias"] + torch.tensor([shift, 0.0, 0.0])}


@pytest.mark.slow  # trains a tiny model once (about a second)
def test_soup_is_the_final_model_only_when_it_beats_the_best_single_trial(trained, tmp_path: Path) -> None:
    setup, good = trained
    plus, minus = _shifted(good, 1000.0), _shifted(good, -1000.0)  # their mean is the good model (up to rounding)
    scores = {name: _val_accuracy(setup, s) for name, s in (("good", good), ("plus", plus), ("minus", minus))}
    assert scores["good"] > max(scores["plus"], scores["minus"])  # the situation: each alone is worse than their mean
    cfg = SearchConfig(model="test_resnet", data=setup.dataset.root, keep_top=2)

    # Two trials on either side of a good model: their average is better than either, so the soup is used.
    (first, s1), (second, s2) = sorted((("plus", plus), ("minus", minus)), key=lambda x: -scores[x[0]])
    run = tmp_path / "soup"
    _save_trial(run / "best", setup, 5, s1, scores[first])
    _save_trial(run / "top" / "trial-0002", setup, 2, s2, scores[second])
    chosen = final.make_final_model(cfg, setup, run / "best")
    assert chosen.kind == "soup" and chosen.trials == (5, 2) and chosen.describe() == "soup of trials [5, 2]"
    assert chosen.val_accuracy > chosen.single_val_accuracy == scores[first]
    written = load_file(str(run / "best" / export.WEIGHTS))
    for key, value in written.items():  # the soup's weights are exactly the mean of its members'
        expected = (
            ((s1[key].double() + s2[key].double()) / 2).to(s1[key].dtype) if value.is_floating_point() else s1[key]
        )
        assert torch.equal(value, expected), key
    meta = json.loads((run / "best" / export.CONFIG).read_text())
    assert meta["final"]["kind"] == "soup" and meta["val_accuracy"] == chosen.val_accuracy
    assert torch.equal(load_file(str(run / "top" / "trial-0005" / export.WEIGHTS))["fc.weight"], s1["fc.weight"])
    assert autoft.load_model(run / "best").predict(setup.dataset.val.images) is not None

    stale = tmp_path / "stale"  # the single trial's own model deleted by hand: best/ keeps the soup it has
    shutil.copytree(run / "best", stale / "best")
    final.restore_single(stale / "best", stale / "top")
    assert final.make_final_model(cfg, setup, stale / "best") == chosen

    # Resuming puts the single trial back into best/ (new trials are compared with a real trial).
    final.restore_single(run / "best", run / "top")
    assert torch.equal(load_file(str(run / "best" / export.WEIGHTS))["fc.weight"], s1["fc.weight"])
    assert not (run / "top" / "trial-0005").exists()

    # The good model and a worse one: their average is worse than the good one, so best/ stays the single trial.
    run = tmp_path / "single"
    _save_trial(run / "best", setup, 1, good, scores["good"])
    _save_trial(run / "top" / "trial-0003", setup, 3, plus, scores["plus"])
    chosen = final.make_final_model(cfg, setup, run / "best")
    assert chosen.kind == "single" and chosen.trials == (1,) and "without lowering val accuracy" in chosen.reason
    assert torch.equal(load_file(str(run / "best" / export.WEIGHTS))["fc.weight"], good["fc.weight"])
    assert json.loads((run / "best" / export.CONFIG).read_text())["final"]["kind"] == "single"

    chosen = final.make_final_model(SearchConfig(model="m", data=Path("d"), soup=False), setup, run / "best")
    assert chosen.kind == "single" and "--no-soup" in chosen.reason


def test_refit_dataset_folds_val_into_train_without_decoding_again(setup: Setup) -> None:
    ds = setup.dataset
    refit = final.refit_dataset(ds, setup.task)
    assert len(refit.train) == len(ds.train) + len(ds.val) and refit.val is ds.val and refit.test is ds.test
    assert torch.equal(refit.train.images[len(ds.train) :], ds.val.images)
    assert torch.equal(refit.train.labels, torch.cat([ds.train.labels, ds.val.labels]))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_refit_exports_the_recipe_trained_on_train_and_val_and_survives_resume(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True, noise=90)
    run = tmp_path / "run"
    result = autoft.search("test_resnet", data, trials=2, run_dir=run, seed=1, refit=True, **TINY)
    assert result.final.kind == "refit" and result.final.trials == (result.best_trial,)
    assert result.final.val_accuracy is None and "val cannot judge it" in result.final.reason
    meta = json.loads((run / "best" / export.CONFIG).read_text())
    assert meta["train_images"] == 3 * 8 + 3 * 2  # every train and val image
    assert meta["final"]["kind"] == "refit" and meta["val_accuracy"] is None
    best_epochs = result.study.best_trial.user_attrs["best_epoch"] + 1
    assert meta["params"]["epochs"] == best_epochs and meta["trial"] == result.best_trial
    single = run / "top" / f"trial-{result.best_trial:04d}"  # the best single trial's own model is kept
    assert json.loads((single / export.CONFIG).read_text())["val_accuracy"] == pytest.approx(result.best_score)
    assert not torch.equal(
        load_file(str(single / export.WEIGHTS))["fc.weight"], load_file(str(run / "best" / export.WEIGHTS))["fc.weight"]
    )

    tuned = autoft.load_model(run / "best")
    test_files = sorted((data / "test").glob("*/*.png"))
    predicted = tuned.predict(test_files)
    accuracy = sum(p == f.parent.name for p, f in zip(predicted, test_files, strict=True)) / len(test_files)
    assert accuracy == pytest.approx(result.test_score) == pytest.approx(meta["test_accuracy"])

    again = autoft.search("test_resnet", data, trials=2, run_dir=run, seed=1, refit=True, **TINY)  # resume: done
    assert len(again.study.trials) == 2 and again.final.kind == "refit" and again.best_trial == result.best_trial
    assert again.test_score == pytest.approx(result.test_score)  # same seed, same refit on the CPU
    assert sorted(p.name for p in (run / "top").iterdir()) == [single.name]


@pytest.mark.slow
def test_cli_summary_says_which_final_model_and_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), noise=90)
    args = ["search", "--model", "test_resnet", "--data", str(data), "--no-pretrained", "--image-size", "16"]
    args += [
        "--trials",
        "2",
        "--max-epochs",
        "2",
        "--no-warm-start",
        "--keep-top",
        "2",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("final model:")]
    meta = json.loads((tmp_path / "r" / "best" / export.CONFIG).read_text())
    assert len(line) == 1 and meta["final"]["description"] in line[0] and " because " in line[0]
