"""Trial throughput from the mapped cache file against the in-memory path, at the demo's size (issue 17).

The demo's model and data (ImageNet EfficientNet-Lite0, scikit-learn's digits at 48 px, ``_common.setup``), once
in memory and once decoded into a cache and mapped from it with the memory bound set to nothing
(``gpu.mapped_data``: every batch is read from the file, as past the bound). Measured, the two sides taking turns
``--repeats`` times (each side's fastest run counts):

- ``trial``: one epoch of full fine-tuning through ``run_trial`` (``gpu.autoft_loop``), images/s;
- ``data``: the task's batches + ``train_inputs`` alone, no model (``gpu.fed_rate``), images/s.

Target: trial throughput from the mapped file >= 0.9x the in-memory path. Prints one JSON line.

    .venv/bin/python benchmarks/mapped_throughput.py [--repeats 3] [--batch-size 32] [--csv FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import demo_config, machine, write_csv
from gpu import autoft_loop, fed_rate, mapped_data

from autoft.preparation import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    config = demo_config()
    in_memory = prepare(config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mapped-throughput-") as tmp:
        mapped = dataclasses.replace(in_memory, dataset=mapped_data(in_memory, config, Path(tmp) / "cache"))
        sides = {"in_memory": in_memory, "mapped": mapped}
        images = len(in_memory.dataset.train)
        best = {(side, part): 0.0 for side in sides for part in ("trial", "data")}
        for repeat in range(args.repeats):
            for side, s in sides.items():
                trial_rate = images / autoft_loop(s, batch_size=args.batch_size)
                data_rate = fed_rate(s, batch_size=args.batch_size, steps=max(1, images // args.batch_size))[0]
                for part, rate in (("trial", trial_rate), ("data", data_rate)):
                    best[side, part] = max(best[side, part], rate)
                    rows.append({"repeat": repeat, "side": side, "part": part, "images_per_s": round(rate, 1),
                                 "load_average_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
    result = {
        "train_images": images,
        "trial_images_per_s": {side: round(best[side, "trial"], 1) for side in sides},
        "data_images_per_s": {side: round(best[side, "data"], 1) for side in sides},
        "trial_mapped_over_in_memory": round(best["mapped", "trial"] / best["in_memory", "trial"], 3),
        "data_mapped_over_in_memory": round(best["mapped", "data"] / best["in_memory", "data"], 3),
        "machine": machine(torch.device("cpu")),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps(result))
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
