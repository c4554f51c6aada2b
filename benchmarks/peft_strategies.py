"""Parameter-efficient strategies vs full fine-tuning: trainable parameters, step time, peak memory, accuracy.

Two parts, one JSON line per strategy each (full, partial (last 2 block groups), linear probe, LoRA r8 on attention,
LoRA r8 on attention + MLP, BitFit, norm-only):

- ``cost``: the ``vit_small_patch16_224`` architecture (21.7 M parameters) at ``--vit-size`` px, RANDOM weights
  (no pretrained ViT installs offline; costs do not depend on the weights). Each strategy runs in a fresh
  subprocess for its trainable parameters (%), the peak RSS growth over the process's RSS before the first step
  (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), the adapter file's size against the full model's and the
  merged model's largest logit difference; then the step time (forward, backward, AdamW step at batch
  ``--batch-size``): the fastest of ``--steps``, all strategies taking turns in one process.
- ``accuracy`` (``--seconds`` > 0): the demo's ImageNet EfficientNet-Lite0 (real weights) on scikit-learn's digits
  at 48 px, each strategy trained through ``run_trial`` for the same wall time (the epoch after which the time is
  up is the last), val and test accuracy of its best epoch. LoRA adapts the convolutions there (a CNN).

    .venv/bin/python benchmarks/peft_strategies.py [--parts cost,accuracy] [--seconds 45] \
        [--csv benchmarks/results/peft.csv]
"""

from __future__ import annotations

import argparse
import copy
import csv
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


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


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
    batch = torch.randn(args.batch_size, 3, args.vit_size, args.vit_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    runs = {}
    for name, fields in STRATEGIES.items():
        torch.manual_seed(0)
        model = timm.create_model(VIT, num_classes=10, pretrained=False, img_size=args.vit_size).to(device)
        recipe = Recipe.from_params(fields | {"batch_size": args.batch_size})
        _trainable(model, recipe)
        runs[name] = (model, optim.create_optimizer(model, recipe))
    fastest = dict.fromkeys(STRATEGIES, float("inf"))
    for round_ in range(args.steps + 1):  # round 0 warms up
        for name, (model, optimizer) in runs.items():
            seconds = _step(model, optimizer, batch, labels, device)
            fastest[name] = min(fastest[name], seconds) if round_ else fastest[name]
    return fastest


def cost(name: str, args: argparse.Namespace) -> dict:
    """One strategy's costs on the ViT, in this (fresh) process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(VIT, num_classes=10, pretrained=False, img_size=args.vit_size).to(device)
    total = blocks.count_parameters(model)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    recipe = Recipe.from_params(STRATEGIES[name] | {"batch_size": args.batch_size})
    batch = torch.randn(args.batch_size, 3, args.vit_size, args.vit_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
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
        "model": f"{VIT} (random weights) at {args.vit_size} px",
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
        plain = timm.create_model(VIT, num_classes=10, pretrained=False, img_size=args.vit_size).to(device).eval()
        plain.load_state_dict(adapters.plain_state(model))
        with torch.no_grad():
            row["merged_max_abs_diff"] = float((plain(batch) - model.eval()(batch)).abs().max())
    return row


def accuracy(args: argparse.Namespace) -> list[dict]:
    """Each strategy through run_trial on the demo's real EfficientNet-Lite0 and digits, for the same wall time."""
    from _common import setup as demo_setup

    from autoft.trial import evaluate, run_trial

    setup = demo_setup(args.device)
    base = {"epochs": 50, "batch_size": 32, "augment": "none", "weight_decay": 0.01, "head_lr_ratio": 10.0}
    rates = {"full": 1e-3, "partial": 1e-3, "linear_probe": 1e-2}  # the parameter-efficient modes: 3e-3
    rows = []
    for name, fields in STRATEGIES.items():
        recipe = Recipe.from_params(base | {"lr": rates.get(name, 3e-3)} | fields)
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
                "model": "tf_efficientnet_lite0 (ImageNet weights) at 48 px, digits",
                "recipe": recipe.describe(),
                "epochs": len(outcome.history),
                "wall_seconds": round(wall, 1),
                "val_accuracy": round(outcome.best_score, 4),
                "test_accuracy": round(test, 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
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
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
