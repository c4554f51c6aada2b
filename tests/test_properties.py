"""Property tests: random space definitions and option values either pass or raise AutoftError, never anything else.

A space that passes must also sample in a real Optuna trial; a configuration that passes must resolve to
a run directory inside ``runs/`` (a study name such as ``../x`` never escapes it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autoft.config import SearchConfig, parse_duration
from autoft.errors import AutoftError
from autoft.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.ERROR)
STUDY = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # one in-memory study, a trial each

# derandomize: CI sees the same examples every run; the @example lines pin the bugs found so far.
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
)
kinds = st.sampled_from(["float", "int", "categorical", "fixed", "bogus"]) | scalars
param_spec = st.one_of(
    anything,
    st.fixed_dictionaries(
        {"type": kinds},
        optional={
            "low": anything,
            "high": anything,
            "log": anything,
            "step": anything,
            "choices": anything,
            "value": anything,
            "when": anything | st.dictionaries(st.sampled_from(["freeze", "epochs", "lr"]), anything, max_size=2),
        },
    ),
    st.builds(
        lambda low, span, log, kind: {"type": kind, "low": low, "high": low + span, "log": log},
        st.integers(-5, 5) | st.floats(-5, 5) | st.sampled_from([math.nan, -math.inf]),
        st.integers(0, 5) | st.floats(0, 5) | st.sampled_from([math.nan, math.inf]),
        st.booleans(),
        st.sampled_from(["float", "int"]),
    ),
)
documents = st.one_of(
    anything,
    st.fixed_dictionaries(
        {"params": st.dictionaries(st.sampled_from(["freeze", "epochs", "lr", 1, "1", None]), param_spec, max_size=4)}
    ),
)


@SETTINGS
@given(documents)
@example({"params": {"lr": {"type": "float", "low": -math.inf, "high": math.inf}}})
@example({"params": {"lr": {"type": "float", "low": math.nan, "high": 1.0}}})
@example({"params": {"freeze": {"type": "categorical", "choices": [[1], {"x": 2}]}}})
@example({"params": {1: {"type": "int", "low": 0, "high": 3}, "1": {"type": "float", "low": 0, "high": 1}}})
@example({"params": {"lr": {"type": "float", "low": 0, "high": 1, "step": math.inf}}})
def test_space_definitions_pass_or_raise_autoft_error(document: Any) -> None:
    try:
        space = SearchSpace.from_dict(document, source="random.yaml")
    except AutoftError:
        return
    trial = STUDY.ask()
    chosen = space.sample(trial)  # a space that passed validation must be usable by a real trial
    assert set(chosen) <= set(space.names())


@SETTINGS
@example(math.nan)
@example(math.inf)
@example("9" * 400)
@example(True)
@given(st.one_of(scalars, st.from_regex(r"\s*\d{1,4}(\.\d)?[smhdx]?(\d{1,3}[smh])?\s*", fullmatch=True)))
def test_durations_pass_or_raise_autoft_error(text: Any) -> None:
    try:
        seconds = parse_duration(text)
    except AutoftError:
        return
    assert seconds is None or (0 < seconds < math.inf)


options = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["test_resnet", "", "  "]) | scalars,
        "data": st.sampled_from(["data", "../data", "/tmp/x"]) | scalars,
        "weights": st.none() | st.sampled_from(["w.pth"]) | scalars,
        "pretrained": st.booleans() | scalars,
        "trials": scalars,
        "timeout": scalars,
        "space": st.sampled_from(["default"]) | scalars,
        "max_epochs": scalars,
        "image_size": scalars,
        "val_fraction": scalars,
        "seed": scalars,
        "sampler": st.sampled_from(["tpe", "random"]) | scalars,
        "pruner": st.sampled_from(["median", "none"]) | scalars,
        "storage": scalars,
        "study_name": st.sampled_from(["..", "../../etc", "a/../../b", "/abs", "ok"]) | scalars,
        "run_dir": st.none() | scalars,
        "device": st.sampled_from(["auto", "cpu", "cuda:1", "tpu"]) | scalars,
    },
)


@SETTINGS
@given(options)
@example({"study_name": ".."})
@example({"study_name": "../../etc"})
@example({"timeout": math.nan})
@example({"model": 3})
@example({"val_fraction": "0.2"})
@example({"seed": -1})
@example({"device": "cuda:1"})
def test_option_values_pass_or_raise_autoft_error(values: dict[str, Any]) -> None:
    values = {"model": "test_resnet", "data": "data"} | values
    try:
        config = SearchConfig(**values).resolved()
    except AutoftError:
        return
    if values.get("run_dir") is None:  # the default run dir comes from the study name: it must stay in runs/
        runs = Path("runs").resolve()
        assert config.run_dir.resolve().parent == runs, config.run_dir
