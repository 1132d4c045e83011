"""The trust steps of ``histoscan calibrate``: fit the referral rule and the tissue check of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from histoscan.bundle import read_bundle
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.tta import tta_views
from histoscan.runfolder import ReferralRule
from histoscan.trust.referral import fit_referral


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
    ks = tta_views(bundle, tta, "fit")
    fit = fitting_predictions(run_dir, ks, data)  # out-of-fold for an ensemble of folds, else validation
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
