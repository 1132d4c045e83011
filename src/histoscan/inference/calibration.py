"""Temperature scaling fitted on the validation split, stored in model.json, applied by the Predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histoscan.bundle import read_bundle
from histoscan.errors import DataError
from histoscan.inference.inputs import store_input_batches
from histoscan.inference.predictor import Predictor
from histoscan.runfolder import RunFolder


@dataclass
class CalibrationResult:
    """The fitted temperature and the validation NLL before and after."""

    temperature: float
    nll_before: float
    nll_after: float
    count: int


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under ``logits / temperature``."""
    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    y = torch.as_tensor(labels)
    if z.shape[1] == 1:
        return float(F.binary_cross_entropy_with_logits(z[:, 0], y.double()))
    return float(F.cross_entropy(z, y))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises validation NLL (LBFGS on log T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        scaled = z / log_t.exp()
        loss = (
            F.binary_cross_entropy_with_logits(scaled[:, 0], y.double())
            if z.shape[1] == 1
            else F.cross_entropy(scaled, y)
        )
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibrate(run_dir: str | Path, data: str | Path | None = None, split: str = "val") -> CalibrationResult:
    """Fit the temperature on the run's ``split`` of ``data`` (default: the store it trained on) and save it."""
    run = RunFolder(run_dir)
    bundle = read_bundle(run_dir)
    part, _ = run.select_patches(run.data_store(data), split)
    if not part.labelled or (part.labels < 0).any():
        raise DataError(f"{part.path}: the {split!r} split is unlabelled; calibration needs labels")
    predictor = Predictor(run_dir, backend="torch")
    logits = np.concatenate([predictor.logits(b.images) for b in store_input_batches(part, predictor.batch_size)])
    labels = part.labels
    t = fit_temperature(logits, labels)
    result = CalibrationResult(t, nll(logits, labels), nll(logits, labels, t), len(part))
    bundle.temperature = t
    bundle.save(run_dir)
    return result
