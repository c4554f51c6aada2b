"""The benchmarks' own parts: the hand-written baselines, the offline data sets and the quality grid's bookkeeping."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial

from conftest import make_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines
import bench_data
import gpu
import quality
import torch

from autoft.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("max_epochs", [3, 20])
def test_handwritten_knobs_are_the_default_space(max_epochs):
    """The script suggests exactly the default space's knobs: same names, conditions, ranges and epoch cap."""
    space = load_space("default").with_max_epochs(max_epochs)
    ours, theirs = {}, {}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(80):
        trial = study.ask()
        knobs = baselines.suggest_knobs(trial, max_epochs=max_epochs)
        assert space.sample(FixedTrial(knobs)) == knobs  # same conditional structure, value for value
        ours |= trial.distributions
        study.tell(trial, 0.0)
    reference = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(80):
        trial = reference.ask()
        space.sample(trial)
        theirs |= trial.distributions
        reference.tell(trial, 0.0)
    assert ours == theirs


def test_method_result_curve_queries():
    curve, cpu_curve = [(5.0, 0.5), (12.0, 0.9), (20.0, 0.7)], [(2.0, 0.5), (3.0, 0.9), (4.0, 0.7)]
    result = baselines.MethodResult("x", 0.9, 0.8, trials=3, seconds=30.0, curve=curve, cpu_curve=cpu_curve)
    assert result.best_by(4.0) is None
    assert result.best_by(11.0) == 0.5 and result.best_by(19.0) == 0.9
    assert result.time_to_reach(0.9) == 12.0 and result.time_to_reach(0.6) == 12.0
    assert result.time_to_reach(0.95) is None
    assert result.best_by(2.5, cpu=True) == 0.5 and result.time_to_reach(0.9, cpu=True) == 3.0


def test_built_data_sets_are_deterministic_and_stratified(tmp_path):
    for name, builder, per_class, classes in (
        ("glyphs", bench_data.build_glyphs, 5, 10),
        ("patches", bench_data.build_patches, 5, 12),
    ):
        first, second = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
        builder(first, per_class=per_class)
        builder(second, per_class=per_class)
        for split, each in (("train", 3), ("val", 1), ("test", 1)):
            folders = sorted((first / split).iterdir())
            assert len(folders) == classes, (name, split)
            assert all(len(list(f.glob("*.png"))) == each for f in folders), (name, split)
        files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
        assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
        assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_build_replaces_a_half_written_set(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(bench_data.BUILDERS, "glyphs", lambda root: calls.append(root) or root.mkdir(parents=True))
    (tmp_path / "glyphs" / "train").mkdir(parents=True)  # left by an interrupted build: no marker
    assert bench_data.build("glyphs", tmp_path) == tmp_path / "glyphs"
    assert bench_data.build("glyphs", tmp_path) == tmp_path / "glyphs"
    assert calls == [tmp_path / "glyphs"]  # built once; the second call found the marker
    assert not (tmp_path / "glyphs" / "train").exists()


def _row(dataset, budget, seed, method, test):
    return {
        "dataset": dataset, "budget_s": budget, "seed": seed, "method": method, "test_accuracy": test,
        "val_accuracy": test, "trials": 2, "seconds": budget, "finished": "now",
    }  # fmt: skip


def test_quality_rows_resume_and_summarize(tmp_path):
    path = tmp_path / "quality.csv"
    scores = {"untuned_default": 0.80, "handwritten_tpe": 0.85, "handwritten_simple": 0.84, "autoft": 0.88}
    for seed in (0, 1):
        for method, score in scores.items():
            quality.append_row(path, _row("digits", 60.0, seed, method, score + 0.01 * seed))
    quality.append_row(path, _row("glyphs", 60.0, 0, "autoft", None))  # a run with no test split
    rows = quality.read_rows(path)
    assert len(rows) == 9 and rows[0]["budget_s"] == 60.0 and rows[0]["seed"] == 0
    assert rows[-1]["test_accuracy"] is None
    cells = quality.summarize(rows, list(quality.METHODS))
    autoft = next(c for c in cells if c["method"] == "autoft")
    assert autoft == {"dataset": "digits", "budget_s": 60.0, "method": "autoft", "mean": 88.5, "sd": 0.71, "n": 2}
    checks = quality.targets(cells, rows)["per_budget"]["1 min"]
    assert checks["cells"] == 1 and checks["gain_vs_untuned_points"] == pytest.approx(8.0)
    assert checks["gain_vs_best_script_points"] == pytest.approx(3.0) and checks["met"]  # vs the TPE script's 85.5
    assert "| digits | 1 min | 80.5 ± 0.7 (n=2) |" in quality.table(cells, list(quality.METHODS))
    # An ablation arm is reported as autoft's gain over it, never a rival; a run past budget + 5% is named.
    quality.append_row(path, _row("digits", 60.0, 0, "autoft_no_exploit", 0.95))
    quality.append_row(path, _row("glyphs", 60.0, 1, "autoft", 0.5) | {"seconds": 64.0})
    every = [*quality.METHODS, *quality.ABLATIONS]
    rows = quality.read_rows(path)
    checks = quality.targets(quality.summarize(rows, every), rows)
    assert checks["ablations_points"] == {"digits 1 min autoft - autoft_no_exploit": -6.5}
    assert checks["runs_over_budget_5pct"] == ["glyphs 60s seed 1: 64s"]
    assert checks["per_budget"]["1 min"]["met"]  # glyphs ran autoft alone: not a comparable cell


@pytest.mark.slow
def test_baselines_run_end_to_end(tmp_path):
    """Each method runs on a tiny model and reports a curve and a test accuracy (real Optuna, real training)."""
    data = make_image_folder(tmp_path / "data", per_class=8, size=(16, 16), with_test=True)
    setup = baselines.bench_setup(data, model="test_resnet", weights=None, image_size=16, pretrained=False)
    script = baselines.handwritten_search(setup, sampler="random", trials=2, timeout=None, seed=0, max_epochs=1)
    assert script.trials == 2 and len(script.curve) == len(script.cpu_curve) == 2
    assert script.curve[0][0] < script.curve[1][0] <= script.seconds
    assert script.val_accuracy == max(v for _, v in script.curve)
    assert 0.0 <= script.test_accuracy <= 1.0
    simple = baselines.handwritten_search(setup, script="simple", trials=1, timeout=None, seed=0, max_epochs=1)
    assert simple.method == "handwritten_simple" and simple.trials == 1 and 0.0 <= simple.test_accuracy <= 1.0
    untuned = baselines.untuned_default(setup, seed=0, max_epochs=1)
    assert untuned.trials == 1 and 0.0 <= untuned.test_accuracy <= 1.0
    ours = baselines.autoft_search(
        data, model="test_resnet", run_dir=tmp_path / "run", trials=1, timeout=None, seed=0, max_epochs=1,
        pretrained=False, image_size=16, device="cpu",
    )  # fmt: skip
    assert ours.trials == 1 and len(ours.curve) == len(ours.cpu_curve) == 1
    assert 0 < ours.curve[0][0] <= ours.seconds and 0 < ours.cpu_curve[0][0] <= ours.cpu_seconds
    assert ours.val_accuracy == ours.curve[0][1] and ours.test_accuracy is not None
    with pytest.raises(SystemExit, match="would continue its study"):
        baselines.autoft_search(data, model="test_resnet", run_dir=tmp_path / "run", trials=1, timeout=None, seed=0,
                                max_epochs=2, pretrained=False, image_size=16)  # fmt: skip


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core CI box more threads spin against each other (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_check_runs_on_the_cpu(one_thread):
    """The prepared GPU check's CPU mode: every figure present, one JSON-able dict, device cpu."""
    out = gpu.run(device="cpu", images=24, ray=False)
    assert out["device"] == "cpu" and out["model"] == "test_resnet" and out["ray"] is None
    assert out["loop"]["autoft_images_per_s"] > 0 and out["loop"]["bare_images_per_s"] > 0
    assert out["data_path"]["fed_over_consumed"] > 0 and out["memory"]["kind"] == "cpu_peak_rss"
    assert out["data_path"]["mapped_cache"]["fed_images_per_s"] > 0  # read from the cache file
    text = out["text_loop"]  # a 2-layer BERT on the CPU: both loops ran over the same 64 sentences
    assert text["train_examples"] == 64 and text["autoft_examples_per_s"] > 0 and text["bare_examples_per_s"] > 0
    assert json.loads(json.dumps(out)) == out


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_ray_search_records_placement(tmp_path, one_thread, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a stale address: without --address the search starts its own
    data = gpu.write_images(tmp_path / "data", count=16, size=32)
    out = gpu.ray_search(data, tmp_path / "run", gpu.TINY, torch.device("cpu"))
    assert out["gpus_per_trial"] == 0.0 and len(out["placement"]) == 2
    assert all(p["node_id"] for p in out["placement"])


def test_the_leave_one_data_set_out_portfolio_never_sees_the_data_set(tmp_path):
    from autoft.space import load_space, read_portfolio

    grid = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "portfolio-grid.csv"
    path = quality.portfolio_without("dots-few", grid, tmp_path)
    learned_from = next(line for line in path.read_text().splitlines() if line.startswith("# over the suite"))
    assert "dots-few" not in learned_from and "glyphs-few@24" in learned_from
    assert len(load_space("default", portfolio=path).portfolio) == len(read_portfolio(path)) == 4
