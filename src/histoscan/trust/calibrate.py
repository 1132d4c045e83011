"""The trust steps of ``histoscan calibrate``: fit the referral rule and the tissue check of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscan.bundle import read_bundle
from histoscan.errors import DataError
from histoscan.inference.predictor import Predictor, default_tta, parse_tta
from histoscan.runfolder import ReferralRule, RunFolder
from histoscan.trust.referral import fit_referral


@dataclass
class FittingPredictions:
    """Labelled predictions a rule is fitted on, and what they are (``val``, or out-of-fold)."""

    probabilities: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray | None
    source: str


def fitting_predictions(
    run_dir: str | Path, data: str | Path | None, tta: Sequence[int], backend: str = "torch"
) -> FittingPredictions:
    """The run's validation predictions under ``tta`` (the validation split already chose the best epoch,
    so out-of-fold predictions are preferable where cross-validation made them: swap the source here)."""
    run = RunFolder(run_dir)
    part, _ = run.select_patches(run.data_store(data), "val")
    if not part.labelled or (part.labels < 0).any():
        raise DataError(f"{part.path}: the validation split is unlabelled; a referral rule needs labels")
    pred = Predictor(run_dir, backend=backend).predict_store(part, list(tta))
    return FittingPredictions(pred.probabilities, part.labels, pred.uncertainty, "val")


def fit_run_referral(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    coverage: float | None = None,
    target_accuracy: float | None = None,
    by: str = "auto",
    tta: bool | Sequence[int] | None = None,
) -> ReferralRule:
    """Fit the referral rule on the run's fitting predictions and save it (with its TTA policy) in model.json.

    ``tta`` None is the model's default TTA (all 8 dihedral views for a binary patch model).
    """
    bundle = read_bundle(run_dir)
    bundle.trust.referral = None  # the default TTA is the model's own, not an older rule's
    ks = default_tta(bundle) if tta is None else parse_tta(tta)
    fit = fitting_predictions(run_dir, data, ks)
    rule = fit_referral(
        fit.probabilities,
        fit.labels,
        fit.uncertainty,
        threshold=bundle.threshold,
        tta=ks,
        coverage=coverage,
        target_accuracy=target_accuracy,
        by=by,
        fitted_on=fit.source,
    )
    bundle = read_bundle(run_dir)
    bundle.trust.referral = rule
    bundle.save(run_dir)
    return rule
