"""The GPU check, prepared (issue 17): what a lent GPU should measure first, in at most ~5 minutes, as one JSON line.

1. ``loop``: autoft's trial loop (``run_trial``: full fine-tuning, AdamW, no augmentation, one epoch + val)
   against a bare PyTorch loop written the fast way (bf16 autocast, channels_last, pinned host batches), same
   model, data, batch size; images/s of each and their ratio.
2. ``data_path``: whether the data path keeps the device busy: images/s the task's batches + train_inputs
   deliver on the device with no model (fed) against images/s of a training step on a batch already there
   (consumed); ``fed / consumed`` >= 1 means the model, not the data, sets the pace.
3. ``memory``: peak memory of that full fine-tuning trial (CUDA: max allocated; CPU: peak RSS).
4. ``ray``: a two-trial search with ``--backend ray --gpus-per-trial 0.5`` (0 on the CPU), with each trial's node,
   start and end, and whether the two overlapped (both placed on the one device at once).
5. ``text_loop``: the text task's trial loop (``run_trial``, full fine-tuning, AdamW, one epoch + val) against a
   bare loop over the same dynamically padded batches (bf16 autocast on CUDA), on a BERT-base shape (12 layers,
   768 wide, random weights) and sentences of 8-48 words; examples/s of each and their ratio (issue 15's target,
   >= 0.95x). Needs the ``text`` extra (transformers); ``null`` without it.

Random weights (``pretrained=False``) and random JPEGs: the figures are speed, not accuracy. On CUDA a resnet50
at 224 px; ``--tiny`` (the default off CUDA) is ``test_resnet`` at 32 px on a few images so CI keeps it working.

    .venv/bin/python benchmarks/gpu.py [--device auto] [--tiny] [--images 2048] [--no-ray] [--no-text]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import autoft
from autoft.config import DATA_MEMORY_ENV, SearchConfig
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.trial import resolve_device, run_trial

FULL = {"model": "resnet50", "image_size": 224, "images": 2048, "batch_size": 128}
TINY = {"model": "test_resnet", "image_size": 32, "images": 48, "batch_size": 16}
TEXT_FULL = {"layers": 12, "hidden": 768, "examples": 8192, "words": 48, "batch_size": 32}
TEXT_TINY = {"layers": 2, "hidden": 32, "examples": 64, "words": 12, "batch_size": 16}
CLASSES = 4


def write_images(root: Path, *, count: int, size: int, seed: int = 0) -> Path:
    """``count`` random-noise JPEGs (a little larger than ``size``, so decoding resizes) in ``CLASSES`` folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size + size // 8, size + size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: only at the edges of what is timed


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def bare_loop(s: Setup, *, batch_size: int) -> float:
    """The fast hand-written loop: one epoch + val; returns seconds."""
    device = s.device
    sync(device)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = copy.deepcopy(s.base_model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mean = torch.tensor(s.spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(s.spec.std, device=device).view(1, 3, 1, 1)
    pin = device.type == "cuda"

    def inputs(images: torch.Tensor) -> torch.Tensor:
        images = images.pin_memory() if pin else images
        x = (images.to(device, non_blocking=True).float() / 255 - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    train, val = s.dataset.train, s.dataset.val
    model.train()
    order = torch.randperm(len(train))
    for start in range(0, len(train), batch_size):
        rows = order[start : start + batch_size]
        with autocast(device):
            loss = F.cross_entropy(model(inputs(train.images[rows])), train.labels[rows].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode(), autocast(device):
        for i in range(0, len(val), 256):
            model(inputs(val.images[i : i + 256])).argmax(1)
    sync(device)
    return time.perf_counter() - started


def recipe(batch_size: int) -> Recipe:
    return Recipe(freeze="full", optimizer="adamw", lr=1e-4, epochs=1, batch_size=batch_size, augment="none")


def text_recipe(batch_size: int) -> Recipe:
    """The text loop's recipe: what the bare text loop does (AdamW lr 5e-5, no decay, one rate, constant)."""
    return Recipe(freeze="full", optimizer="adamw", lr=5e-5, head_lr_ratio=1.0, layer_decay=1.0, weight_decay=0.0,
                  epochs=1, warmup_epochs=0, schedule="constant", batch_size=batch_size, augment="none")  # fmt: skip


def timed_trial(s: Setup, rec: Recipe) -> float:
    """Seconds of one ``run_trial`` of ``rec`` without the caches (a full fine-tune uses neither)."""
    sync(s.device)
    started = time.perf_counter()
    run_trial(dataclasses.replace(s, prefix_cache=None, feature_cache=None), rec, seed=0)
    sync(s.device)
    return time.perf_counter() - started


def autoft_loop(s: Setup, *, batch_size: int) -> float:
    return timed_trial(s, recipe(batch_size))


def fed_rate(s: Setup, *, batch_size: int, steps: int) -> tuple[float, tuple]:
    """Images/s the task's batches + train_inputs deliver on the device (no model), and the last inputs."""
    device, rec = s.device, Recipe(augment="light", batch_size=batch_size)
    generator = torch.Generator().manual_seed(0)
    n_classes = len(s.dataset.classes)
    fed, last = 0, None
    sync(device)
    started = time.perf_counter()
    while fed < steps * batch_size:
        for batch in s.task.batches(s.dataset.train, batch_size=batch_size, shuffle=True, generator=generator):
            last = s.task.train_inputs(batch, rec, s.spec, num_classes=n_classes, device=device, generator=generator)
            fed += len(batch[1])
    sync(device)
    return fed / (time.perf_counter() - started), last


def mapped_data(s: Setup, config: SearchConfig, cache: Path):
    """The setup's data decoded into a cache in ``cache`` and mapped from it, its train/val split mapped too (the
    memory bound set to nothing for the call), so batches are read from the file as past the bound."""
    before = os.environ.get(DATA_MEMORY_ENV)
    os.environ[DATA_MEMORY_ENV] = "1e-9"
    try:
        return s.task.load_data(dataclasses.replace(config, cache_dir=cache), s.spec)
    finally:
        if before is None:
            del os.environ[DATA_MEMORY_ENV]
        else:
            os.environ[DATA_MEMORY_ENV] = before


def data_path(s: Setup, *, batch_size: int, steps: int, mapped: Setup | None = None) -> dict:
    """Images/s the data path delivers on the device (in memory, and from the mapped cache file when ``mapped``
    is given) vs images/s a training step consumes."""
    device = s.device
    fed, last = fed_rate(s, batch_size=batch_size, steps=steps)
    mapped_fed = fed_rate(mapped, batch_size=batch_size, steps=steps)[0] if mapped is not None else None
    model = copy.deepcopy(s.base_model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = last

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: cuDNN picks its kernels
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    consumed_rate = steps * len(y) / (time.perf_counter() - started)
    from_file = None  # the same split read per batch from the cache's mapped file
    if mapped_fed is not None:
        from_file = {"fed_images_per_s": round(mapped_fed, 1),
                     "fed_over_consumed": round(mapped_fed / consumed_rate, 2),
                     "mapped_over_in_memory": round(mapped_fed / fed, 2)}  # fmt: skip
    return {
        "in_memory_fed_images_per_s": round(fed, 1),
        "consumed_images_per_s": round(consumed_rate, 1),
        "fed_over_consumed": round(fed / consumed_rate, 2),
        "keeps_device_busy": fed >= consumed_rate,
        "mapped_cache": from_file,
    }


def peak_memory(s: Setup, *, batch_size: int) -> dict:
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.device)
        autoft_loop(s, batch_size=batch_size)
        peak = torch.cuda.max_memory_allocated(s.device)
        return {"kind": "cuda_max_allocated", "peak_mib": round(peak / 2**20, 1), "batch_size": batch_size}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, the whole process so far
    return {"kind": "cpu_peak_rss", "peak_mib": round(peak_kib / 1024, 1), "batch_size": batch_size}


def ray_search(data: Path, run_dir: Path, settings: dict, device: torch.device) -> dict:
    """Two trials under Ray, half a GPU each; where and when each ran."""
    gpus = 0.5 if device.type == "cuda" else 0.0
    started = time.perf_counter()
    result = autoft.search(
        settings["model"], data, trials=2, backend="ray", gpus_per_trial=gpus, cpus_per_trial=1, pretrained=False,
        image_size=settings["image_size"], max_epochs=1, run_dir=run_dir, device=device.type, warm_start=False,
        priors=False, model_selection=False, soup=False, refit=False,
    )  # fmt: skip
    trials = [t for t in result.study.trials if t.datetime_start is not None]
    spans = [(t.datetime_start, t.datetime_complete or t.datetime_start) for t in trials]
    overlap = len(spans) == 2 and spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    return {
        "gpus_per_trial": gpus,
        "seconds": round(time.perf_counter() - started, 1),
        "placement": [_placement(t, start, end) for t, (start, end) in zip(trials, spans, strict=True)],
        "trials_overlapped": overlap,
    }


def _placement(trial, start, end) -> dict:
    seconds = round((end - start).total_seconds(), 1)
    return {"trial": trial.number, "state": trial.state.name, "node_id": trial.user_attrs.get("node_id"),
            "seconds": seconds}  # fmt: skip


def write_text(root: Path, settings: dict, *, seed: int = 0) -> tuple[Path, Path]:
    """A random BERT of ``settings``' shape with a WordPiece vocabulary of 1,000 words, and ``train.csv`` /
    ``val.csv`` (an eighth) of sentences of 8 to ``words`` of those words with 3 labels."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = [f"w{i}" for i in range(1000)]
    model_dir, data = root / "bert", root / "text"
    model_dir.mkdir(parents=True)
    data.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    heads = max(2, settings["hidden"] // 64)
    width = settings["hidden"]
    config = BertConfig(
        vocab_size=1005, hidden_size=width, num_hidden_layers=settings["layers"], num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    count = settings["examples"]
    for name, rows in (("train", count), ("val", count // 8)):
        lines = ["text,label"]
        for i in range(rows):
            length = int(rng.integers(8, settings["words"] + 1))
            lines.append(" ".join(rng.choice(words, length)) + f",{('neg', 'neu', 'pos')[i % 3]}")
        (data / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return model_dir, data


def text_bare_loop(s: Setup, *, batch_size: int) -> float:
    """The hand-written text loop: one epoch + val over the same batches; returns seconds."""
    from autoft.tasks.text import tokens

    device = s.device
    sync(device)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = copy.deepcopy(s.base_model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)

    def on_device(inputs: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}

    model.train()
    generator = torch.Generator().manual_seed(0)
    for inputs, labels in tokens.batches(s.dataset.train, batch_size=batch_size, shuffle=True, generator=generator):
        with autocast(device):
            loss = F.cross_entropy(model(on_device(inputs)), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode(), autocast(device):
        for inputs, _ in tokens.batches(s.dataset.val, batch_size=256, shuffle=False):
            model(on_device(inputs)).argmax(1)
    sync(device)
    return time.perf_counter() - started


def text_loop(root: Path, device: torch.device, *, tiny: bool) -> dict | None:
    """autoft's text trial loop against :func:`text_bare_loop` (fastest of 2 each, after a warm-up)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    settings = TEXT_TINY if tiny else TEXT_FULL
    model_dir, data = write_text(root, settings)
    s = prepare(SearchConfig(model=str(model_dir), data=data, task="text", pretrained=False, device=device.type))
    batch = settings["batch_size"]
    text_bare_loop(s, batch_size=batch)  # warm-up for both sides
    bare = min(text_bare_loop(s, batch_size=batch) for _ in range(2))
    mine = min(timed_trial(s, text_recipe(batch)) for _ in range(2))
    seen = len(s.dataset.train)
    return {
        "model": f"BERT shape, {settings['layers']} layers x {settings['hidden']}, random weights",
        "train_examples": seen,
        "max_length": s.dataset.train.max_length,
        "batch_size": batch,
        "autoft_examples_per_s": round(seen / mine, 1),
        "bare_examples_per_s": round(seen / bare, 1),
        "ratio": round(bare / mine, 3),
        "target": ">= 0.95",
    }


def machine(device: torch.device) -> dict:
    out = {"device": device.type, "cpus": os.cpu_count(), "torch": torch.__version__}
    if device.type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(device), "bf16": torch.cuda.is_bf16_supported()}
    return out | {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def run(
    *, device: str = "auto", tiny: bool | None = None, images: int | None = None, ray: bool = True, text: bool = True
) -> dict:
    """Every measurement, as one dict (``main`` prints it as JSON)."""
    dev = resolve_device(device)
    tiny = tiny if tiny is not None else dev.type != "cuda"
    settings = dict(TINY if tiny else FULL)
    settings["images"] = images or settings["images"]
    batch = settings["batch_size"]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autoft-gpu-check-") as tmp:
        data = write_images(Path(tmp) / "data", count=settings["images"], size=settings["image_size"])
        config = SearchConfig(model=settings["model"], data=data, pretrained=False, image_size=settings["image_size"],
                              device=dev.type)  # fmt: skip
        started = time.perf_counter()
        s = prepare(config)
        decode_s = time.perf_counter() - started
        bare_loop(s, batch_size=batch)  # warm-up for both sides (cuDNN autotuning, allocator)
        bare = min(bare_loop(s, batch_size=batch) for _ in range(2))
        ours = min(autoft_loop(s, batch_size=batch) for _ in range(2))
        mapped = dataclasses.replace(s, dataset=mapped_data(s, config, Path(tmp) / "cache"))
        seen = len(s.dataset.train)
        out = {
            "benchmark": "gpu",
            "device": dev.type,
            "model": settings["model"],
            "image_size": settings["image_size"],
            "train_images": seen,
            "decode_images_per_s": round(settings["images"] / decode_s, 1),
            "loop": {
                "autoft_images_per_s": round(seen / ours, 1),
                "bare_images_per_s": round(seen / bare, 1),
                "ratio": round(bare / ours, 3),
                "bare": "bf16 autocast (CUDA), channels_last, pinned host batches",
            },
            "data_path": data_path(s, batch_size=batch, steps=5 if dev.type != "cuda" else 20, mapped=mapped),
            "memory": peak_memory(s, batch_size=batch),
            "ray": ray_search(data, Path(tmp) / "run", settings, dev) if ray else None,
            "text_loop": text_loop(Path(tmp) / "text-check", dev, tiny=tiny) if text else None,
        }
    return out | {"seconds": round(time.perf_counter() - began, 1), "machine": machine(dev)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", default=None, help="test_resnet at 32 px (default off CUDA)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--no-ray", dest="ray", action="store_false")
    parser.add_argument("--no-text", dest="text", action="store_false", help="skip the text loop")
    args = parser.parse_args(argv)
    print(json.dumps(run(device=args.device, tiny=args.tiny, images=args.images, ray=args.ray, text=args.text)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
