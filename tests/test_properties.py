"""Property tests: random space definitions and option values either pass or raise AutoftError, never anything else.

A space that passes must also sample in a real Optuna trial; a configuration that passes must resolve to
a run directory inside ``runs/`` (a study name such as ``../x`` never escapes it).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any
from unittest import mock

import huggingface_hub.constants
import optuna
import pytest
import timm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import autoft.cli
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


# ----------------------------------------------------------------------------- --model and --data through the CLI

odd_text = st.text(max_size=24) | st.sampled_from(["", " ", "\n", "[/]", "[bold]x", "🙂", "é/ü", "C:\\model", "~"])
model_values = odd_text | st.sampled_from(
    ["hf-hub:x", "hf-hub:", "local-dir:/nope", "local-dir:", "./nope", "/", ".", "..", "resnet50/", "a,b", ",",
     "x:y:z", "test_resnet", "test_resnet\n", "my-model", "./my-model/", "local-dir:my-model", "a_file", "empty",
     "bad-config", "my-model/config.json", "local-dir:a_file"]
)  # fmt: skip
data_values = odd_text | st.sampled_from(["nope", ".", "a_file", "empty", "my-model", "bad-config", "/nonexistent/x"])


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of things a user may point --model or --data at: a real timm model folder and wrong ones."""
    root = tmp_path_factory.mktemp("odd")
    timm.models.save_for_hf(timm.create_model("test_resnet"), str(root / "my-model"), safe_serialization=True)
    (root / "a_file").write_text("not a model")
    (root / "empty").mkdir()
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text('{"architecture": 3}')
    return root


@settings(SETTINGS, max_examples=80)
@given(model=model_values, data=data_values, pretrained=st.booleans())
@example(model="./my-model", data="nope", pretrained=True)
@example(model="hf-hub:x", data="nope", pretrained=True)
@example(model="[/]", data="nope", pretrained=False)
@example(model="my-model/config.json", data="nope", pretrained=False)
@example(model="test_resnet", data="a\nb", pretrained=False)
def test_odd_model_and_data_values_are_one_line_and_exit_2(
    odd_paths: Path, tmp_path_factory: pytest.TempPathFactory, model: str, data: str, pretrained: bool
) -> None:
    run_dir = tmp_path_factory.getbasetemp() / "odd-run"
    args = ["search", f"--model={model}", f"--data={data}", f"--run-dir={run_dir}", "--trials=1"]
    err = io.StringIO()
    # Offline: a hub name fails from the (empty) cache at once, the same with or without a network.
    with (
        contextlib.chdir(odd_paths),
        contextlib.redirect_stderr(err),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
    ):
        code = autoft.cli.main([*args, *([] if pretrained else ["--no-pretrained"])])
    text = err.getvalue()
    assert code == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and text.strip().endswith(errors[0].strip()), text
