"""The search configuration: read once at the edge (CLI or ``autoft.search``), validated, frozen.

Inner code never sees argparse; it sees a :class:`SearchConfig`. The resolved configuration is written
to ``config.yaml`` beside every run so a search can be read back and repeated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoft.errors import AutoftError

__all__ = ["BACKENDS", "PRUNERS", "SAMPLERS", "SearchConfig", "parse_duration"]

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "local", "ray")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from a duration such as ``"90s"``, ``"30m"``, ``"1h30m"`` or a plain number of seconds.

    >>> parse_duration("1h30m")
    5400.0
    """
    if text is None:
        return None
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
    if seconds <= 0:
        raise AutoftError(f"--timeout must be positive, but got {text!r}.")
    return seconds


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "study"


@dataclass(frozen=True)
class SearchConfig:
    """Everything one search needs, validated on construction.

    >>> cfg = SearchConfig(model="test_resnet", data=Path("data"), trials=4)
    >>> cfg.resolved().study_name
    'test_resnet-data'
    """

    model: str
    data: Path
    weights: Path | None = None
    pretrained: bool = True
    trials: int | None = 20
    timeout: float | None = None
    space: str = "default"
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
    backend: str = "auto"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        if self.run_dir is not None:
            object.__setattr__(self, "run_dir", Path(self.run_dir))
        self._validate()

    def _validate(self) -> None:
        if not self.model or not self.model.strip():
            raise AutoftError("--model is empty; give a timm model name such as resnet50.")
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials < 1):
            raise AutoftError(f"--trials must be a whole number of at least 1, but got {self.trials!r}.")
        if self.timeout is not None and self.timeout <= 0:
            raise AutoftError(f"--timeout must be positive, but got {self.timeout!r} seconds.")
        if not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise AutoftError(f"--max-epochs must be a whole number of at least 1, but got {self.max_epochs!r}.")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 16):
            raise AutoftError(f"--image-size must be a whole number of pixels >= 16, but got {self.image_size!r}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise AutoftError(f"--val-fraction must lie strictly between 0 and 1, but got {self.val_fraction!r}.")
        for flag, value, valid in (
            ("--sampler", self.sampler, SAMPLERS),
            ("--pruner", self.pruner, PRUNERS),
            ("--device", self.device, DEVICES),
            ("--backend", self.backend, BACKENDS),
        ):
            if value not in valid:
                raise AutoftError(f"{flag} {value!r} is not known; choose one of: {', '.join(valid)}.")
        for flag, value in (("--cpus-per-trial", self.cpus_per_trial), ("--gpus-per-trial", self.gpus_per_trial)):
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise AutoftError(f"{flag} must be a number >= 0 (fractions share a device), but got {value!r}.")
        if self.max_concurrent is not None and (not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            raise AutoftError(f"--max-concurrent must be a whole number >= 1, but got {self.max_concurrent!r}.")
        if self.backend == "local" and self.address is not None:
            raise AutoftError("--address names a Ray cluster but --backend is local; drop one of them.")
        if self.weights is not None and not self.pretrained:
            raise AutoftError("--weights and --no-pretrained contradict each other; give one of them.")

    def resolved(self) -> SearchConfig:
        """A copy with the defaults that depend on other fields filled in (study name, run dir, storage)."""
        study_name = self.study_name or _slug(f"{self.model}-{self.data.resolve().name}")
        run_dir = self.run_dir or Path("runs") / study_name
        storage = self.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
        trials = self.trials if (self.trials is not None or self.timeout is not None) else 20
        return dataclasses.replace(self, study_name=study_name, run_dir=run_dir, storage=storage, trials=trials)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings) for ``config.yaml`` and ``best/config.json``."""
        out = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

    def save(self, path: Path) -> None:
        """Write the configuration as YAML."""
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
