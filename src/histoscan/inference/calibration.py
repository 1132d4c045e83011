"""Temperature scaling, stored in model.json and applied by the Predictor.

Temperature scaling fitted on the rows ``fitting_predictions`` chooses (the calibration rows of the run's split,
else its validation split; an ensemble of folds without calibration rows: out-of-fold predictions), stored in
model.json, applied by the Predictor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histoscan.bundle import read_bundle
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.probabilities import logits_of, probabilities
from histoscan.inference.settings import PredictorSettings


@dataclass
class CalibrationResult:
    """The fitted temperature and the validation NLL before and after."""

    temperature: float
    nll_before: float
    nll_after: float
    count: int
    source: str = "the validation split"


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


def calibrate(
    run_dir: str | Path,
    data: str | Path | None = None,
    tta: bool | Sequence[int] | None = None,
    settings: PredictorSettings | None = None,
) -> CalibrationResult:
    """Fit and store a run's temperature.

    Fit the temperature on the predictions ``fitting_predictions`` chooses (the validation split, or an
    ensemble's out-of-fold predictions) and save it in model.json.

    The fit is relative to the stored temperature (the new one is the stored one times the fitted factor),
    so calibrating twice changes nothing.
    """
    bundle = read_bundle(run_dir)
    fitting = fitting_predictions(run_dir, tta, data, settings)
    logits, labels = logits_of(fitting.probabilities), fitting.labels
    factor = fit_temperature(logits, labels)
    t = float(np.clip(bundle.temperature * factor, 0.05, 20.0))
    result = CalibrationResult(t, nll(logits, labels), nll(logits, labels, factor), len(labels), fitting.source)
    bundle.temperature = t
    bundle.fitted.temperature = fitting.record
    bundle.inference.tta = list(fitting.record.under.tta)  # what is fitted is what answers: the deployed views
    if bundle.task == "binary" and 0 < bundle.threshold < 1:  # the same decisions at the new temperature
        bundle.threshold = float(
            probabilities(logits_of(np.array([[1 - bundle.threshold, bundle.threshold]])) / factor)[0, 1]
        )
    bundle.save(run_dir)
    return result
