"""The search configuration: read once at the edge (CLI or ``autoft.search``), validated, frozen.

Inner code never sees argparse; it sees a :class:`SearchConfig`. The resolved configuration is written
to ``config.yaml`` beside every run so a search can be read back and repeated.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autoft.errors import AutoftError
from autoft.space import describe_space

__all__ = [
    "BACKENDS",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "Objective",
    "SearchConfig",
    "detect_task",
    "parse_duration",
    "parse_objectives",
]

SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc")
PRUNERS = ("median", "hyperband", "sha", "wilcoxon", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "local", "ray")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Objective:
    """One objective: its direction, the trial user attr that holds its value, and how to show it."""

    name: str
    direction: str
    attr: str
    label: str


OBJECTIVES: dict[str, Objective] = {
    "accuracy": Objective("accuracy", "maximize", "best_score", "val accuracy"),
    "params": Objective("params", "minimize", "params", "parameters"),
    "latency": Objective("latency", "minimize", "latency_ms", "latency ms/image"),
}


def parse_objectives(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"accuracy,params"`` -> ``("accuracy", "params")``; accuracy comes first, each name once.

    >>> parse_objectives("accuracy,latency")
    ('accuracy', 'latency')
    """
    if not isinstance(text, str | list | tuple):
        raise AutoftError(f"--objective must be names such as accuracy,params, but got {text!r}.")
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    choices = "accuracy, accuracy,params, accuracy,latency or accuracy,params,latency"
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names:
        raise AutoftError(f"--objective {text!r} names unknown objective(s) {unknown}; choose {choices}.")
    if names[0] != "accuracy" or len(set(names)) != len(names):
        raise AutoftError(
            f"--objective {text!r} must start with accuracy and name each objective once; choose {choices}."
        )
    return tuple(names)


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from a duration such as ``"90s"``, ``"30m"``, ``"1h30m"`` or a plain number of seconds.

    >>> parse_duration("1h30m")
    5400.0
    """
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise AutoftError(f"--timeout must be a duration such as 30m or a number of seconds, but got {text!r}.")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        cleaned = text.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", cleaned):
            seconds = float(cleaned)
        elif cleaned and _DURATION_PART.sub("", cleaned) == "":
            seconds = sum(float(n) * _SECONDS_PER_UNIT[u] for n, u in _DURATION_PART.findall(cleaned))
        else:
            raise AutoftError(
                f"--timeout {text!r} is not a duration; write it like 90s, 30m, 2h or 1h30m (or plain seconds)."
            )
    if not 0 < seconds < math.inf:
        raise AutoftError(f"--timeout must be a positive, finite duration, but got {text!r}.")
    return seconds


TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")
CACHE_ENV = "AUTOFT_CACHE_DIR"  # where decoded images are kept when --cache-dir is not given
DATA_MEMORY_ENV = "AUTOFT_DATA_MEMORY"  # GiB of decoded images a search may copy into memory (default RAM / 4)
CACHE_FOLDER = ".autoft-cache"  # the default cache, beside the run dir (runs/.autoft-cache): its siblings share it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NER_SUFFIXES = (".conll", ".txt", ".iob", ".bio")


def detect_task(data: Path) -> str:
    """The task the data is for: a CSV/TSV/JSONL file (or a folder with train.csv, or class folders of .txt files)
    is text, unless its first row names an image file (an image manifest); CoNLL files (.conll, .txt; or JSONL
    with ``tokens``) are NER; anything else (image folders, Parquet, CIFAR batches) is images.

    >>> detect_task(Path("reviews.csv")), detect_task(Path("photos"))
    ('text', 'image')
    """
    if data.is_dir():
        train = sorted(p for p in data.iterdir() if p.stem.lower() == "train" and p.is_file())
        if train:
            return detect_task(train[0])
        classes = [p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return "text" if classes and all(any(c.glob("*.txt")) for c in classes) else "image"
    suffix = data.suffix.lower()
    if suffix == ".jsonl" and data.is_file():
        with data.open("rb") as handle:
            return "ner" if b'"tokens"' in handle.readline() else "text"
    if suffix in (".csv", ".tsv") and data.is_file() and _names_an_image(data):
        return "image"
    return "text" if suffix in TEXT_SUFFIXES else "ner" if suffix in NER_SUFFIXES else "image"


def _names_an_image(manifest: Path) -> bool:
    """Whether a CSV/TSV file's first data row has a cell that is an image file name (``a/1.jpg,cat``)."""
    with manifest.open(encoding="utf-8-sig", errors="replace") as handle:
        handle.readline()
        row = handle.readline().strip()
    cells = row.replace("\t", ",").split(",")
    return any(Path(c.strip().strip('"')).suffix.lower() in IMAGE_SUFFIXES for c in cells)


def _known_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _slug(text: str) -> str:
    """A safe single path component: no separators, and no leading dots (so never ``..``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "study"


def _model_names(model: Any) -> str:
    """``"a, b"`` or ``["a", "b"]`` -> ``"a,b"``; empty or repeated names are an error."""
    names = model.split(",") if isinstance(model, str) and model.strip() else model
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
        raise AutoftError(f"--model must be a timm model name such as resnet50 (or several: a,b), but got {model!r}.")
    names = [n.strip() for n in names]
    if not all(names):
        raise AutoftError(f"--model {model!r} has an empty name; separate model names with single commas: a,b.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AutoftError(f"--model names {', '.join(repeated)} more than once; give each candidate model once.")
    return ",".join(_absolute_folder(n) for n in names)


def _absolute_folder(name: str) -> str:
    """A model given as a path to an existing folder (``./my-model``, ``local-dir:my-model``), made absolute (a
    ``local-dir:`` prefix kept), so the exported model's config finds it again from any working directory; any
    other name is left as it is."""
    path = name.removeprefix("local-dir:")
    if path == name and not any(c in name for c in "/\\") and not name.startswith((".", "~")):
        return name  # a timm name (or an hf-hub: id, which has no leading dot and is no folder here)
    try:
        folder = Path(path).expanduser()
        prefix = name[: len(name) - len(path)]
        return prefix + str(folder.resolve()) if folder.is_dir() else name
    except (OSError, RuntimeError, ValueError):  # too long, a loop, a NUL: models.check_name says what is wrong
        return name


def _short_model_names(model: str) -> str:
    """The models for a study name: a folder by its own name, not its whole path."""
    paths = [Path(n.removeprefix("local-dir:")) for n in model.split(",")]
    return ",".join(p.name if p.is_absolute() else n for p, n in zip(paths, model.split(","), strict=True))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _path(flag: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip() or "\0" in str(value):
        raise AutoftError(f"{flag} must be a path, but got {value!r}.")
    return Path(value)


@dataclass(frozen=True)
class SearchConfig:
    """Everything one search needs, validated on construction.

    ``model`` is one timm name or several (``"a,b"`` or a list): several make the model a searched choice,
    after model selection drops the weak ones (``model_selection``). It is stored as ``"a,b"``; ``models``
    gives the names.

    >>> cfg = SearchConfig(model="test_resnet", data=Path("data"), trials=4)
    >>> cfg.resolved().study_name
    'test_resnet-data'
    >>> SearchConfig(model=["test_resnet", "test_efficientnet"], data=Path("data")).models
    ('test_resnet', 'test_efficientnet')
    """

    model: str  # one model name, or several: "a,b" or a list (stored as "a,b")
    data: Path
    task: str = "auto"  # a name in autoft.tasks (image, text, ner); auto: detected from the data (detect_task)
    weights: Path | None = None
    pretrained: bool = True
    trials: int | None = 20
    timeout: float | None = None
    space: Any = "default"  # preset name, YAML path, SearchSpace, or a space(trial) -> dict function
    space_overrides: tuple[str, ...] = ()  # --set PARAM.FIELD=VALUE
    space_fixed: tuple[str, ...] = ()  # --fix PARAM=VALUE
    max_epochs: int = 10
    image_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    study_name: str | None = None
    run_dir: Path | None = None
    device: str = "auto"
    warm_start: bool = True  # try the space's portfolio of strong recipes first (--no-warm-start: don't)
    exploit: bool = True  # after the portfolio, its best recipe's neighbours before sampling (--no-exploit)
    warm_start_from: Path | None = None  # --warm-start RUN_DIR: seed the new study with that run's trials
    portfolio: Path | None = None  # --portfolio FILE: these recipes first, instead of the space's own portfolio
    objectives: tuple[str, ...] = ("accuracy",)  # --objective accuracy[,params][,latency]
    backend: str = "auto"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    keep_top: int = 1
    export_adapter: bool = False  # also write a parameter-efficient trial's trained parameters alone (adapter)
    compile: bool = False  # torch.compile the training forward (pays a compile per trial; for long trials on GPU)
    soup: bool = True  # greedy soup of the --keep-top models when its val accuracy beats the best single trial
    refit: bool = False  # final model: the best recipe trained again on train+val
    model_selection: bool = True  # with several models: drop the weak ones before the search (selection.py)
    priors: bool = True  # let the probe narrow a bundled preset's space (autoft.plan; docs/controller.md)
    text_column: str | None = None  # text: the column of the sentences ("a,b": a sentence pair); default detected
    label_column: str | None = None  # text: the column of the labels; default detected (label, labels, class, ...)
    encoding: str = "utf-8"  # text: the encoding of the data files
    cache: bool = True  # images: keep decoded images on disk for later searches (--no-cache: decode every time)
    cache_dir: Path | None = None  # where (default $AUTOFT_CACHE_DIR, else RUN_DIR/../.autoft-cache once resolved)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _model_names(self.model))
        object.__setattr__(self, "data", _path("--data", self.data))
        object.__setattr__(self, "objectives", parse_objectives(self.objectives))
        if self.cache is True and self.cache_dir is None and os.environ.get(CACHE_ENV, "").strip():
            object.__setattr__(self, "cache_dir", Path(os.environ[CACHE_ENV]).expanduser())
        for name, flag in (
            ("weights", "--weights"), ("run_dir", "--run-dir"), ("warm_start_from", "--warm-start"),
            ("cache_dir", "--cache-dir"), ("portfolio", "--portfolio"),
        ):  # fmt: skip
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _path(flag, getattr(self, name)))
        object.__setattr__(self, "space_overrides", tuple(self.space_overrides or ()))
        object.__setattr__(self, "space_fixed", tuple(self.space_fixed or ()))
        if self.task == "auto":
            object.__setattr__(self, "task", detect_task(self.data))
        self._validate()

    @property
    def models(self) -> tuple[str, ...]:
        """The candidate model names, in the order given."""
        return tuple(self.model.split(","))

    def _validate(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip():
            raise AutoftError(f"--task must be a task name such as image, but got {self.task!r}.")
        for flag, value in (("--text-column", self.text_column), ("--label-column", self.label_column)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise AutoftError(f"{flag} must be a column name, but got {value!r}.")
        if not isinstance(self.encoding, str) or not _known_encoding(self.encoding):
            raise AutoftError(f"--encoding {self.encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1).")
        if not isinstance(self.pretrained, bool):
            raise AutoftError(f"pretrained must be True or False, but got {self.pretrained!r}.")
        if self.trials is not None and (not _whole(self.trials) or self.trials < 1):
            raise AutoftError(f"--trials must be a whole number of at least 1, but got {self.trials!r}.")
        if self.timeout is not None and (not _number(self.timeout) or self.timeout <= 0):
            raise AutoftError(f"--timeout must be a positive number of seconds, but got {self.timeout!r}.")
        if isinstance(self.space, str | Path) and not str(self.space).strip():
            raise AutoftError(f"--space must be a preset name or a YAML file, but got {self.space!r}.")
        if not isinstance(self.space, str | Path) and not callable(self.space) and not hasattr(self.space, "sample"):
            raise AutoftError(
                f"space must be a preset name, a YAML file, a SearchSpace or a space(trial) function, "
                f"but got {self.space!r}."
            )
        if self.portfolio is not None and not self.portfolio.is_file():
            raise AutoftError(
                f"--portfolio {self.portfolio}: no such file; give a YAML file with 'portfolio:' and a list of recipes."
            )
        flags = ("warm_start", "exploit", "compile", "soup", "refit", "model_selection", "priors", "export_adapter",
                 "cache")  # fmt: skip
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise AutoftError(f"{name} must be True or False, but got {getattr(self, name)!r}.")
        if not _whole(self.max_epochs) or self.max_epochs < 1:
            raise AutoftError(f"--max-epochs must be a whole number of at least 1, but got {self.max_epochs!r}.")
        if self.image_size is not None and (not _whole(self.image_size) or not 16 <= self.image_size <= 4096):
            raise AutoftError(
                f"--image-size must be a whole number of pixels from 16 to 4096, but got {self.image_size!r}."
            )
        if not _number(self.val_fraction) or not 0.0 < self.val_fraction < 1.0:
            raise AutoftError(f"--val-fraction must lie strictly between 0 and 1, but got {self.val_fraction!r}.")
        if not _whole(self.seed) or not 0 <= self.seed < 2**31:
            raise AutoftError(f"--seed must be a whole number from 0 to 2**31 - 1, but got {self.seed!r}.")
        for flag, value, valid in (
            ("--sampler", self.sampler, SAMPLERS),
            ("--pruner", self.pruner, PRUNERS),
            ("--backend", self.backend, BACKENDS),
        ):
            if not isinstance(value, str) or value not in valid:
                raise AutoftError(f"{flag} {value!r} is not known; choose one of: {', '.join(valid)}.")
        if not isinstance(self.device, str) or not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise AutoftError(f"--device {self.device!r} is not known; choose one of: {', '.join(DEVICES)}, cuda:N.")
        for flag, value in (
            ("--storage", self.storage),
            ("--study-name", self.study_name),
            ("--address", self.address),
        ):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise AutoftError(f"{flag} must be a non-empty string, but got {value!r}.")
        for flag, value in (("--cpus-per-trial", self.cpus_per_trial), ("--gpus-per-trial", self.gpus_per_trial)):
            if value is not None and (not _number(value) or value < 0):
                raise AutoftError(f"{flag} must be a number >= 0 (fractions share a device), but got {value!r}.")
        if not _whole(self.keep_top) or self.keep_top < 1:
            raise AutoftError(f"--keep-top must be a whole number >= 1 (models kept), but got {self.keep_top!r}.")
        if self.max_concurrent is not None and (not _whole(self.max_concurrent) or self.max_concurrent < 1):
            raise AutoftError(f"--max-concurrent must be a whole number >= 1, but got {self.max_concurrent!r}.")
        if self.backend == "local" and self.address is not None:
            raise AutoftError("--address names a Ray cluster but --backend is local; drop one of them.")
        if len(self.objectives) > 1 and self.keep_top > 1:
            raise AutoftError(
                "--keep-top ranks one objective; with several (--objective) every Pareto-front model is kept in "
                "pareto/ already: drop --keep-top."
            )
        if not self.cache and self.cache_dir is not None:
            raise AutoftError(f"--no-cache and --cache-dir {self.cache_dir} contradict each other; give one of them.")
        if self.weights is not None and not self.pretrained:
            raise AutoftError("--weights and --no-pretrained contradict each other; give one of them.")
        if self.weights is not None and len(self.models) > 1:
            raise AutoftError(
                f"--weights loads one file into one model, but --model names {len(self.models)} ({self.model}); "
                "search a single model with --weights, or drop --weights."
            )

    def resolved(self) -> SearchConfig:
        """A copy with the defaults that depend on other fields filled in (study name, run dir, storage, cache).

        The default run dir is ``runs/`` + the study name as a safe slug: a name like ``../x`` stays inside. The
        default image cache lies beside the run dir (``runs/.autoft-cache``), so every search under ``runs/`` shares
        it; ``--cache-dir`` or ``$AUTOFT_CACHE_DIR`` share one across projects, ``--no-cache`` turns it off.
        """
        study_name = self.study_name or _slug(f"{_short_model_names(self.model)}-{self.data.resolve().name}")
        run_dir = self.run_dir or Path("runs") / _slug(study_name)
        storage = self.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
        trials = self.trials if (self.trials is not None or self.timeout is not None) else 20
        cache_dir = self.cache_dir or (run_dir.parent / CACHE_FOLDER if self.cache else None)
        return dataclasses.replace(
            self, study_name=study_name, run_dir=run_dir, storage=storage, trials=trials, cache_dir=cache_dir
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings) for ``config.yaml`` and ``best/config.json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["space"] = describe_space(self.space)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def save(self, path: Path) -> None:
        """Write the configuration as YAML."""
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
