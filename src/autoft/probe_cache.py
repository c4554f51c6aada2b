"""The probe's measurements kept beside the decoded-data cache entry, so a new search on the same data and model
does not probe again.

A search in a new run directory has no study to resume, so without this it would run the linear probe (and, with
``--timeout``, time an epoch) again although the data are mapped from the cache in seconds: on a 3,000-image set
the probe was most of the time to the first trial. A :class:`Slot` is one JSON file ``probe-<key>.json`` in the
cache entry (``Dataset.cache_entry``); its key hashes everything the measurements depend on: the data (the entry's
own key, the train/val split's sizes and labels), the model (its class and a digest of every weight, so the model
name, ``--weights``, ``--no-pretrained`` and the seeded head all count), the input spec, the seed, the probe's
sample sizes and steps, and for the timings the device and torch's thread count. It is plain JSON (never code),
written to a temporary file and renamed into place, and ignored when unreadable or not what a probe holds. No
cache entry (``--no-cache``, a task without a data cache) means no slot: nothing is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoft import probe, step_cost
from autoft.preparation import Setup

__all__ = ["Slot", "slot"]

log = logging.getLogger(__name__)

VERSION = 2  # bump when the probe measures differently, so old measurements are not reused (2: evaluation timed
# on evaluation batches, the linear probe's first sample)


@dataclass(frozen=True)
class Slot:
    """Where one setup's probe is kept: ``path`` (``<cache entry>/probe-<key>.json``)."""

    path: Path

    def load(self) -> tuple[probe.Probe, float] | None:
        """The kept probe and when it was measured (seconds since the epoch); None when absent or unreadable."""
        try:
            record = json.loads(self.path.read_text())
            measured = probe.Probe(**record["probe"])
            created = float(record["created"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, half-written by hand, or another version's: measure again
        return (measured, created) if _plausible(measured) else None

    def save(self, measured: probe.Probe) -> None:
        """Keep ``measured`` (write then rename: a reader sees the old file or the new one, never half of one)."""
        record = {"version": VERSION, "created": time.time(), "probe": dataclasses.asdict(measured)}
        try:
            handle, name = tempfile.mkstemp(prefix=".probe.", suffix=".json", dir=self.path.parent)
        except OSError as exc:  # a read-only shared cache: the search goes on, the next one probes again
            log.info("could not keep the probe's measurements in %s (%s)", self.path.parent, exc)
            return
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(record, f)
            os.replace(name, self.path)
        except BaseException as exc:
            Path(name).unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            log.info("could not keep the probe's measurements in %s (%s)", self.path, exc)


def _plausible(measured: probe.Probe) -> bool:
    """Every field a number of the right kind (JSON may hold anything: a hand-edited file is not trusted)."""
    optional = (measured.linear_probe_accuracy, measured.epoch_seconds_full, measured.epoch_seconds_head,
                measured.eval_seconds_per_image)  # fmt: skip
    numbers = [measured.chance, measured.seconds, *(v for v in optional if v is not None)]
    numbers += [v for c in measured.modes for v in (c.seconds_per_example, c.epoch_seconds)]
    counts = [measured.examples, *(v for c in measured.modes for v in (c.trainable, c.parameters))]
    counts += [c.peak_bytes for c in measured.modes if c.peak_bytes is not None]
    names = [v for c in measured.modes for v in (c.mode, c.timed)]
    return (
        all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in counts)
        and all(isinstance(v, str) for v in names)
    )


def slot(setup: Setup, *, seed: int) -> Slot | None:
    """The slot of ``setup``'s probe with ``seed``, or None when its data came from no cache entry."""
    entry = setup.dataset.cache_entry
    if entry is None or not entry.is_dir():
        return None
    return Slot(entry / f"probe-{key(setup, seed=seed)}.json")


def key(setup: Setup, *, seed: int) -> str:
    """A digest of everything the probe's measurements depend on (module docstring)."""
    dataset, device = setup.dataset, setup.device
    digest = hashlib.blake2b(digest_size=16)
    parts = [
        VERSION, str(dataset.cache_entry.name if dataset.cache_entry else ""), len(dataset.train), len(dataset.val),
        type(setup.base_model).__name__, repr(setup.spec), seed, probe.PROBE_TRAIN_EXAMPLES, probe.PROBE_VAL_EXAMPLES,
        probe.FIRST_TRAIN_EXAMPLES, probe.FIRST_VAL_EXAMPLES,
        step_cost.TIMED_STEPS, step_cost.TIMING_BATCH, step_cost.RECIPE_BATCH, step_cost.RECIPE_STEPS, str(device),
        torch.get_num_threads(), torch.cuda.get_device_name(device) if device.type == "cuda" else "", torch.__version__,
    ]  # fmt: skip
    digest.update(json.dumps(parts).encode())
    for split in (dataset.train, dataset.val):
        digest.update(split.labels.cpu().numpy().tobytes())
    digest.update(_weights_digest(setup.base_model))
    return digest.hexdigest()


def _weights_digest(model: nn.Module) -> bytes:
    """Every parameter and buffer's name, shape, dtype, sum and 64 values spread over it: a changed weight changes
    it, at the cost of one pass over the weights (tens of ms for a resnet50), not of hashing their bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            spread = flat[:: max(1, len(flat) // 64)][:64]
            total = flat.sum(dtype=torch.float64).item() if flat.is_floating_point() else flat.sum().item()
            values = [*spread.double().tolist(), total]
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype), values]).encode())
    return digest.digest()
