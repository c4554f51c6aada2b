"""The search's last trial trains until the search ends: its optimizer steps are fitted to its measured pace.

The plan sizes every trial from the probe's epoch times with a margin (``budget.EPOCH_SAFETY``), so the trial that
starts last usually ends well before the search must. When no other trial could start after it, that time would go
unused: at 3 minutes on 1,450 NER sentences the one fine-tune (342 steps, planned at 50 s a round) ended with time
left, and Hugging Face's ``Trainer``, which simply trains until stopped, got ~480 steps in the same wall time.

:class:`StepFit` re-sizes such a trial from its own pace: after a few steps, and again after each epoch, the steps
that fit before the trial deadline (its remaining validations set aside) become its length, shared evenly by its
epochs; the schedule (warmup, cosine decay) follows the new length, so the trial still ends at a low learning rate
instead of being cut mid-schedule. A slower machine shrinks the trial the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

__all__ = ["FIRST_FIT_STEPS", "StepFit"]

FIRST_FIT_STEPS = 8  # the steps timed (after the first, which pays one-off costs) before the first fit


@dataclass
class StepFit:
    """A trial's step count, fitted to end training by ``until`` (a ``time.time()`` reading).

    ``epochs`` share ``total`` steps (``planned`` until the first fit); ``validation`` is one validation's seconds,
    the plan's estimate until the trial measures its own. The trial loop calls :meth:`retime` when what trains
    changes (inactive while only the head trains: LP-FT's probe epochs keep their planned steps), :meth:`start_epoch`
    before an epoch's steps, :meth:`after_step` after each and :meth:`after_epoch` once the epoch is validated. The
    pace is the time between steps (validations excluded; the first step after a retime, which pays one-off costs,
    too). A fit shares the steps left evenly among the epochs left, from the start of the epoch it is made in.

    >>> fit = StepFit(epochs=2, planned=100, warmup_epochs=0, until=time.time() + 60, validation=5.0)
    >>> fit.epoch_end(0), fit.epoch_end(1)
    (50, 100)
    """

    epochs: int
    planned: int
    warmup_epochs: int
    until: float
    validation: float
    total: int = field(init=False)
    fitted: bool = field(default=False, init=False)
    active: bool = field(default=True, init=False)
    _from: tuple[int, int] = field(default=(0, 0), init=False, repr=False)  # (epoch, step) the last fit shares from
    _epoch_step: int = field(default=0, init=False, repr=False)  # the step count when the current epoch began
    _seconds: float = field(default=0.0, init=False, repr=False)  # the steps timed took this long
    _steps: int = field(default=-1, init=False, repr=False)  # steps timed (-1: the first is still to come)
    _mark: float = field(default=0.0, init=False, repr=False)  # when the step being timed began

    def __post_init__(self) -> None:
        self.total = self.planned

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.total / self.epochs)

    def epoch_end(self, epoch: int) -> int:
        """The step count at which ``epoch`` (from 0) ends."""
        first, step = self._from
        return step + math.ceil((self.total - step) * (epoch - first + 1) / (self.epochs - first))

    def retime(self, *, active: bool) -> None:
        """Times afresh (LP-FT's fine-tuning steps cost more than its probe's); inactive: no timing, no fit."""
        self._seconds, self._steps, self.fitted, self.active = 0.0, -1, False, active

    def start_epoch(self, step: int) -> None:
        self._epoch_step, self._mark = step, time.perf_counter()

    def after_step(self, step: int, epoch: int) -> None:
        """Times the step just done (``step`` done in all); fits the trial once FIRST_FIT_STEPS are timed."""
        if not self.active:
            return
        now = time.perf_counter()
        if self._steps >= 0:
            self._seconds += now - self._mark
        self._steps, self._mark = self._steps + 1, now
        if self._steps == FIRST_FIT_STEPS and not self.fitted:
            self._fit(step, epoch, epoch_step=self._epoch_step)

    def after_epoch(self, step: int, epoch: int, *, validation_seconds: float) -> None:
        """Refits the epochs after ``epoch`` on the pace so far and the validation it measured."""
        self.validation = validation_seconds
        if self.active and epoch + 1 < self.epochs and self._steps > 0:
            self._fit(step, epoch + 1, epoch_step=step)

    def _fit(self, step: int, epoch: int, *, epoch_step: int) -> None:
        """``total`` such that training on from ``step`` (in ``epoch``, begun at ``epoch_step``) at the measured pace,
        with one validation per epoch left, ends by ``until``; every epoch left keeps at least one step."""
        pace = self._seconds / max(1, self._steps)
        left = self.until - time.time() - (self.epochs - epoch) * self.validation
        self.total = max(step + (self.epochs - epoch), step + int(left / max(pace, 1e-6)))
        self._from, self.fitted = (epoch, epoch_step), True
