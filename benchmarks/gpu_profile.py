"""Where autoft's trial loop spends the time the bare loop does not, on a GPU: ``torch.profiler`` over one epoch of
each (after a warm-up), with ``gpu.py``'s recipes, models and data: its BERT shape or its resnet50 (``--task
image``; until 2026-12-04 this profiled the text recipe's settings there: no weight decay, one rate); the top ops
by self CPU and self CUDA time, and each loop's wall time, to ``--out``. With ``--ablate``, no profiler: the
autoft trial timed (median of 3 interleaved rounds) as it is and with one suspect at a time taken out (the
best-epoch copy to the host, the fused optimizer, the per-step learning-rate update, the validation), beside the
bare loop, as JSON.

    python3 benchmarks/gpu_profile.py [--task text] [--out profile.txt] [--ablate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import gpu
from torch.profiler import ProfilerActivity, profile

from autoft import adapters, optim, trial
from autoft.config import SearchConfig
from autoft.preparation import prepare
from autoft.trial import resolve_device

# What each ablation takes out of the trial loop (the loop is otherwise unchanged).
SUSPECTS = {
    "as_is": contextlib.nullcontext,
    "no_best_copy": lambda: mock.patch.object(adapters, "plain_state", lambda model: {"kept": True}),
    "unfused_optimizer": lambda: mock.patch.object(optim, "FUSED", ()),
    "no_lr_update": lambda: mock.patch.object(optim, "set_lr", lambda optimizer, lr: None),
    "no_validation": lambda: mock.patch.object(trial, "evaluate", lambda model, split, setup: (0.0, 0.5)),
}


def ablate(s, bare_loop, recipe, batch: int, *, rounds: int = 3) -> dict:
    """Seconds of the bare loop and of the autoft trial with each suspect taken out: the median of ``rounds``
    rounds, each round running every variant once (interleaved: on an H200 a BERT epoch at batch 32 is bound by
    kernel launches, and its time drifted by 20 % between the runs of one call, 2026-12-04)."""
    runs = {"bare": contextlib.nullcontext} | SUSPECTS
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, patch in runs.items():
            with patch():
                seconds[name].append(
                    bare_loop(s, batch_size=batch) if name == "bare" else gpu.timed_trial(s, recipe(batch))
                )
    return {k: {"median": round(statistics.median(v), 3), "all": [round(x, 3) for x in v]} for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="text", choices=("text", "image"))
    parser.add_argument("--out", default="profile.txt")
    parser.add_argument("--ablate", action="store_true", help="time the trial with each suspect taken out")
    args = parser.parse_args()
    device = resolve_device("auto")
    tiny = device.type != "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        if args.task == "text":
            settings = dict(gpu.TEXT_TINY if tiny else gpu.TEXT_FULL)
            model_dir, data = gpu.write_text(Path(tmp), settings)
            config = SearchConfig(model=str(model_dir), data=data, task="text", pretrained=False, device=device.type)
            bare_loop, recipe = gpu.text_bare_loop, gpu.text_recipe
        else:
            settings = dict(gpu.TINY if tiny else gpu.FULL)
            data = gpu.write_images(Path(tmp) / "data", count=settings["images"], size=settings["image_size"])
            config = SearchConfig(model=settings["model"], data=data, pretrained=False,
                                  image_size=settings["image_size"], device=device.type)  # fmt: skip
            bare_loop, recipe = gpu.bare_loop, gpu.recipe
        s = prepare(config)
        batch = settings["batch_size"]
        runs = {"bare": lambda: bare_loop(s, batch_size=batch), "autoft": lambda: gpu.timed_trial(s, recipe(batch))}
        for run in runs.values():
            run()  # warm-up
        if args.ablate:
            result = {"task": args.task, "device": device.type, "seconds": ablate(s, bare_loop, recipe, batch)}
            print(json.dumps(result))
            return
        lines = []
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, run in runs.items():
            wall = run()
            with profile(activities=activities) as prof:
                profiled = run()
            table = prof.key_averages()
            lines += [f"== {name}: {wall:.3f} s unprofiled, {profiled:.3f} s profiled",
                      table.table(sort_by="self_cpu_time_total", row_limit=25)]  # fmt: skip
            if device.type == "cuda":
                lines.append(table.table(sort_by="self_cuda_time_total", row_limit=25))
        Path(args.out).write_text("\n".join(lines))
        print("\n".join(line for line in lines if line.startswith("==")))


if __name__ == "__main__":
    main()
