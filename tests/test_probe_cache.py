"""The probe kept beside the decoded-data cache entry (probe_cache.py): a new run dir on the same data and model
does not probe again; another seed, another model, --no-cache or an unreadable file do."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import pytest

from autoft import probe, step_cost
from autoft.config import SearchConfig
from autoft.controller import Progress, run_search
from conftest import make_image_folder

TINY = {"pretrained": False, "image_size": 16, "max_epochs": 1, "trials": 1, "warm_start": False}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=6, size=(16, 16))


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the real linear probe's runs (the function runs; the wrapper only counts)."""
    calls: list[int] = []
    real = probe._staged_linear_probe

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "_staged_linear_probe", counted)
    return calls


class _TrialStarted(BaseException):
    """Ends a search at its first trial's start: the plan (and the probe) are done by then."""


def _stop(event: Progress) -> None:
    if event.kind == "trial_start":
        raise _TrialStarted


def _search(data: Path, tmp_path: Path, run: str, **overrides) -> dict:
    """The probe the search's plan recorded in its study."""
    settings = {"model": "test_resnet", "cache_dir": tmp_path / "cache"} | TINY | overrides
    config = SearchConfig(data=data, run_dir=tmp_path / "runs" / run, **settings).resolved()
    with pytest.raises(_TrialStarted):
        run_search(config, progress=_stop)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{config.run_dir / 'study.db'}")
    return study.user_attrs["plan"]["probe"]


def _kept(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*/probe-*.json"))


def test_a_new_run_dir_reuses_the_kept_probe_and_says_so(data, tmp_path, probes, caplog) -> None:
    first = _search(data, tmp_path, "a")
    assert len(probes) == 1 and len(_kept(tmp_path)) == 1
    with caplog.at_level(logging.INFO, logger="autoft.controller"):
        second = _search(data, tmp_path, "b")
    assert len(probes) == 1  # not run again
    assert second == first
    assert "probe (cached, from 20" in caplog.text


def test_another_seed_or_model_probes_again_and_no_cache_keeps_nothing(data, tmp_path, probes) -> None:
    _search(data, tmp_path, "a")
    _search(data, tmp_path, "b", seed=1)  # another train/val split and head: its own measurements
    _search(data, tmp_path, "c", model="test_efficientnet")
    assert len(probes) == 3 and len(_kept(tmp_path)) == 3
    _search(data, tmp_path, "d", seed=1)  # each is then reused
    assert len(probes) == 3
    no_cache = {"cache": False, "cache_dir": None}
    _search(data, tmp_path, "e", **no_cache)
    _search(data, tmp_path, "f", **no_cache)
    assert len(probes) == 5 and len(_kept(tmp_path)) == 3  # --no-cache: measured every time, kept nowhere


@pytest.mark.parametrize(
    "content",
    ["{not json", "wrong-types"],
    ids=["garbage", "wrong-types"],
)
def test_an_unreadable_kept_probe_is_ignored_and_replaced(data, tmp_path, probes, content) -> None:
    _search(data, tmp_path, "a")
    (kept,) = _kept(tmp_path)
    if content == "wrong-types":  # every field present, one of them not a number
        record = json.loads(kept.read_text())
        record["probe"]["chance"] = "__import__('os')"
        content = json.dumps(record)
    kept.write_text(content)
    _search(data, tmp_path, "b")
    assert len(probes) == 2  # measured again
    assert json.loads(kept.read_text())["probe"]["linear_probe_accuracy"] is not None  # and kept again


def test_a_kept_probe_with_mode_costs_comes_back_whole_and_a_bad_mode_is_refused(tmp_path: Path) -> None:
    """The per-mode step costs (--timeout with LoRA/BitFit/norm in the space) are kept too, and checked on load."""
    from autoft.probe_cache import Slot

    lora = step_cost.ModeCost("lora", "LoRA r32", 1e-3, 2.5, trainable=1000, parameters=50_000, peak_bytes=None)
    measured = probe.Probe(0.8, 0.25, 4.0, 1.0, 1e-4, seconds=3.0, examples=96, modes=(lora,))
    slot = Slot(tmp_path / "probe-k.json")
    slot.save(measured)
    assert slot.load()[0] == measured
    record = json.loads(slot.path.read_text())
    record["probe"]["modes"][0]["trainable"] = "1000"  # a hand-edited file: not trusted
    slot.path.write_text(json.dumps(record))
    assert slot.load() is None
