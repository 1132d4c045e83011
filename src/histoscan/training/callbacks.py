"""Callbacks: atomic last.ckpt, per-epoch summary line + metrics.csv + best weights."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from torch import nn

from histoscan.bundle import save_weights
from histoscan.runfolder import METRIC_COLUMNS, RunFolder  # noqa: F401  (METRIC_COLUMNS: imported from here before)

MONITOR = "val_auroc"


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` (weights, optimiser, schedule, loop and callback state) after every epoch.

    Written to a temporary file and renamed, so a kill at any moment leaves either the
    previous checkpoint or the new one, never half of one.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = RunFolder(run_dir).last_ckpt

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save last.ckpt at the end of each epoch."""
        if trainer.sanity_checking:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()


class EpochSummary(Checkpoint):
    """After each epoch: keep the best weights (``best.safetensors``), append a row to ``metrics.csv``, print one line.

    A ``Checkpoint`` subclass so Lightning runs it after the module's epoch-end logging.
    Its best value is saved in ``last.ckpt``, so a resumed run keeps comparing against it.
    """

    def __init__(self, run_dir: Path, printer: Any = print, validate: bool = True) -> None:
        self.run = RunFolder(run_dir)
        self.printer = printer
        self.validate = validate  # without validation the last epoch's weights are kept
        self.best: float = -math.inf
        self.best_epoch: int = -1
        self.best_weights = "model"  # or "ema": the weight average scored better
        self.diverged: str | None = None  # why training stopped early: its loss stopped being a number
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock."""
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the epoch's line and keep the best weights."""
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        epoch = trainer.current_epoch
        current = m.get(MONITOR, math.nan)
        ema_auroc = m.get(f"{MONITOR}_ema", math.nan)
        ema = getattr(pl_module, "ema", None)
        use_ema = ema is not None and ema_auroc > current  # NaN (no validation) compares False: the model's own
        score = ema_auroc if use_ema else current
        improved = not math.isnan(score) and score > self.best
        if improved or not self.validate:  # without validation every epoch replaces the weights
            self.best = score if improved else self.best
            self.best_epoch = epoch
            self.best_weights = "ema" if use_ema else "model"
            if trainer.is_global_zero:
                weights = cast(nn.Module, ema.module if ema is not None and use_ema else pl_module.model)
                save_weights(weights, self.run.weights_path)
        plan = getattr(pl_module, "plan", None)
        time_left = plan.time_left() if plan is not None else None
        row = {
            "epoch": epoch,
            "train_loss": m.get("train_loss_epoch", m.get("train_loss")),
            "train_auroc": m.get("train_auroc"),
            "train_acc": m.get("train_acc"),
            "val_loss": m.get("val_loss"),
            "val_auroc": current,
            "val_acc": m.get("val_acc"),
            "val_f1": m.get("val_f1"),
            "lr": m.get("lr"),
            "images_per_s": m.get("images_per_s"),
            "epoch_time_s": round(time.perf_counter() - self._t0, 2),
            "best_val_auroc": self.best,
            "val_auroc_ema": ema_auroc if ema is not None else None,
            "best_weights": self.best_weights,
            "planned_epochs": plan.planned_epochs if plan is not None else None,
            "time_left_s": round(time_left, 1) if time_left is not None else None,
        }
        loss = m.get("train_loss_epoch", m.get("train_loss"))
        if loss is not None and not math.isfinite(loss):
            # the weights are NaN from here on, so every further epoch is lost time: stop, keep the best
            self.diverged = (
                f"the training loss became {loss} in epoch {epoch}; training stopped there and the best weights "
                f"so far (epoch {self.best_epoch}) are kept: lower the learning rate or check the data"
            )
            trainer.should_stop = True
        if trainer.is_global_zero:
            self.run.append_metrics(row)
            self.printer(
                f"epoch {epoch:3d}  loss {_f(row['train_loss'])}  val_loss {_f(row['val_loss'])}  "
                f"val_auroc {_f(current)}"
                + (f" (ema {_f(ema_auroc)})" if ema is not None else "")
                + f"  val_acc {_f(row['val_acc'])}  lr {_f(row['lr'], '.2e')}  "
                f"{_f(row['images_per_s'], '.0f')} img/s  "
                + (
                    f"best {_f(self.best)} (epoch {self.best_epoch}, {self.best_weights})"
                    if self.validate
                    else "no validation: keeping the last epoch"
                )
                + (f"  plan {row['planned_epochs']} epochs" if plan is not None else "")
            )
            if self.diverged:
                self.printer(f"{self.run.path}: {self.diverged}")

    def state_dict(self) -> dict[str, Any]:
        """The best score so far, for the checkpoint."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best score from a checkpoint."""
        self.best = state_dict.get("best", -math.inf)
        self.best_epoch = state_dict.get("best_epoch", -1)
        self.best_weights = state_dict.get("best_weights", "model")


def _f(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
