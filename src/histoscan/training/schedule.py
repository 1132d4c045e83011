"""The warmup + cosine learning-rate plan, re-planned at each epoch boundary when the run has a time budget.

Without a budget the plan is fixed (``max_epochs``) and the schedule is the classic linear warmup
then cosine to ``floor``: deterministic by seed. With a budget, each epoch boundary measures the
epoch's wall time (training and validation), takes the median of the last ``RECENT`` epochs (one
slow epoch, a checkpoint or a neighbour's burst, does not move the plan; a lasting slowdown does
within two epochs), counts how many more epochs fit before the deadline at that pace, and spreads
the rest of the cosine over them, so the schedule reaches its floor at the
last epoch that fits, however slow or shared the machine. The plan is a callback's state, so it
is saved in ``last.ckpt`` and ``--resume`` continues it.

Written here rather than taken from a library: torch's and Lightning's schedulers fix their
length when they are built, and none re-plans from measured time.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

FLOOR = 0.01  # the cosine ends at this fraction of the peak learning rate
RECENT = 3  # epochs whose median wall time sets the pace the plan assumes


class SchedulePlan(Callback):
    """Learning-rate factor per optimizer step (``factor``) and the epoch plan behind it.

    Args:
        max_epochs: the most epochs the run may take.
        warmup_epochs: linear warmup length in epochs.
        budget_s: wall-clock budget in seconds (None: plan ``max_epochs``, no re-planning).
        floor: the factor the cosine ends at.
    """

    def __init__(
        self, max_epochs: int, warmup_epochs: float = 0.0, budget_s: float | None = None, floor: float = FLOOR
    ) -> None:
        self.max_epochs, self.warmup_epochs, self.budget_s, self.floor = max_epochs, warmup_epochs, budget_s, floor
        self.planned_epochs = max_epochs
        self.progress = 0.0  # fraction of the cosine done at ``step0``
        self.step0 = 0  # the optimizer step at which the current epoch's plan starts
        self.rate = 0.0  # cosine progress per step in the current epoch
        self.steps_per_epoch = 0
        self.elapsed_s = 0.0  # wall time spent in earlier sessions of this run (resume)
        self.recent_s: list[float] = []  # wall times of the last RECENT epochs
        self._fit_start = self._epoch_start = time.monotonic()

    # ---- the factor LambdaLR multiplies the peak learning rate by -----------------------
    @property
    def warmup_steps(self) -> int:
        """Warmup length in optimizer steps."""
        return int(self.warmup_epochs * max(1, self.steps_per_epoch))

    def cosine_progress(self, step: int) -> float:
        """Fraction of the cosine done at optimizer ``step``."""
        if step < self.warmup_steps:
            return 0.0
        start = max(self.step0, self.warmup_steps)
        return min(1.0, self.progress + max(0, step - start) * self.rate)

    def factor(self, step: int) -> float:
        """Linear warmup to 1, then cosine to ``floor`` along the current plan."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.cosine_progress(step)))

    # ---- planning ------------------------------------------------------------------------
    def time_left(self) -> float | None:
        """Seconds left of the budget (None without one)."""
        if self.budget_s is None:
            return None
        return self.budget_s - self.elapsed_s - (time.monotonic() - self._fit_start)

    def replan(self, step: int, epochs_done: int, epoch_s: float | None) -> None:
        """Plan the epochs left from ``step`` on: the cosine reaches its floor when they are done.

        ``epoch_s`` is the assumed epoch wall time (training and validation, see ``pace``); with a budget,
        the epochs that fit in the time left are planned (at least the one about to run is
        not planned when none fits: the run stops instead).
        """
        self.progress = self.cosine_progress(step)
        self.step0 = step
        left = self.max_epochs - epochs_done
        remaining = self.time_left()
        if remaining is not None and epoch_s:
            left = min(left, int(max(0.0, remaining) // max(epoch_s, 1e-6)))
        self.planned_epochs = epochs_done + max(0, left)
        steps_left = left * self.steps_per_epoch - max(0, self.warmup_steps - step)
        self.rate = (1.0 - self.progress) / max(1, steps_left)

    def pace(self) -> float | None:
        """The epoch time the plan assumes: the median of the recent epochs (None before the first)."""
        if not self.recent_s:
            return None
        ordered = sorted(self.recent_s)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    # ---- Lightning hooks ---------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock of the time budget."""
        self._fit_start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-plan the remaining epochs to fit the time budget."""
        self._epoch_start = time.monotonic()
        steps = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 0
        if steps and steps != self.steps_per_epoch:  # the first epoch of a session: plan from what is known
            self.steps_per_epoch = steps
            if trainer.global_step == 0:
                self.replan(0, 0, None)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After training and validation of an epoch: re-plan from its measured time, or stop when done."""
        if trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1
        self.recent_s = [*self.recent_s, time.monotonic() - self._epoch_start][-RECENT:]
        if self.budget_s is not None:
            self.replan(trainer.global_step, done, self.pace())
        if self.budget_s is not None and self.planned_epochs <= done:
            trainer.should_stop = True  # the plan is finished: the next epoch would not fit

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add this fit's time to the time spent."""
        self.elapsed_s += time.monotonic() - self._fit_start
        self._fit_start = time.monotonic()

    # ---- saved in last.ckpt ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The plan, for the checkpoint."""
        elapsed = self.elapsed_s + time.monotonic() - self._fit_start
        return {
            "planned_epochs": self.planned_epochs,
            "progress": self.progress,
            "step0": self.step0,
            "rate": self.rate,
            "steps_per_epoch": self.steps_per_epoch,
            "elapsed_s": elapsed,
            "budget_s": self.budget_s,
            "recent_s": list(self.recent_s),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the plan from a checkpoint."""
        for key in ("planned_epochs", "progress", "step0", "rate", "steps_per_epoch", "elapsed_s", "recent_s"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        self._fit_start = time.monotonic()
