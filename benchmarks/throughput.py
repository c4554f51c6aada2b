"""Images/s of autoft's trial loop vs a plain hand-written PyTorch loop: same model, data, batch size, device.

Both fully fine-tune a copy of the same pretrained model for the same epochs (AdamW, no augmentation) and
evaluate val after each epoch; they run alternately in one process, and each side's best run counts.
Prints one line of JSON.

    .venv/bin/python benchmarks/throughput.py [--epochs 1] [--repeats 2] [--batch-size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
from _common import MODEL, machine, setup

from autoft.recipe import Recipe
from autoft.trial import run_trial


def plain_loop(s, *, epochs: int, batch_size: int) -> float:
    """The loop a person writes by hand; returns its wall time in seconds."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = copy.deepcopy(s.base_model).to(s.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mean = torch.tensor(s.spec.mean, device=s.device).view(1, 3, 1, 1)
    std = torch.tensor(s.spec.std, device=s.device).view(1, 3, 1, 1)
    train, val = s.dataset.train, s.dataset.val
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), batch_size):
            rows = order[start : start + batch_size]
            x = (train.images[rows].to(s.device).float() / 255 - mean) / std
            loss = F.cross_entropy(model(x), train.labels[rows].to(s.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            logits = torch.cat(
                [
                    model((val.images[i : i + 256].to(s.device).float() / 255 - mean) / std)
                    for i in range(0, len(val), 256)
                ]
            )
            (logits.argmax(1).cpu() == val.labels).float().mean().item()
    return time.perf_counter() - started


def autoft_loop(s, *, epochs: int, batch_size: int) -> float:
    recipe = Recipe(freeze="full", optimizer="adamw", lr=1e-4, epochs=epochs, batch_size=batch_size, augment="none")
    started = time.perf_counter()
    run_trial(dataclasses.replace(s, prefix_cache=None), recipe, seed=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    s = setup(args.device)
    plain, ours = [], []
    for _ in range(args.repeats):  # alternate, so load from other processes hits both sides alike
        plain.append(plain_loop(s, epochs=args.epochs, batch_size=args.batch_size))
        ours.append(autoft_loop(s, epochs=args.epochs, batch_size=args.batch_size))
    images = len(s.dataset.train) * args.epochs
    result = {
        "benchmark": "throughput",
        "model": MODEL,
        "image_size": s.dataset.image_size,
        "train_images": len(s.dataset.train),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "autoft_images_per_s": round(images / min(ours), 1),
        "plain_images_per_s": round(images / min(plain), 1),
        "ratio": round(min(plain) / min(ours), 3),
        "target": ">= 0.95",
        "autoft_seconds": [round(t, 2) for t in ours],
        "plain_seconds": [round(t, 2) for t in plain],
        "machine": machine(s.device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
