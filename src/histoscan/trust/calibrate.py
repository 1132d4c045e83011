"""The trust steps of ``histoscan calibrate``: fit the referral rule and the tissue check of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from histoscan.bundle import read_bundle
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import tta_views
from histoscan.runfolder import ReferralRule
from histoscan.trust.referral import fit_referral


def fit_run_referral(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    coverage: float | None = None,
    target_accuracy: float | None = None,
    target_sensitivity: float | None = None,
    delta: float = 0.05,
    by: str = "probability",
    tta: bool | Sequence[int] | None = None,
    settings: PredictorSettings | None = None,
) -> ReferralRule:
    """Fit the referral rule on the run's fitting predictions and save it (with its TTA policy) in model.json.

    The fitting predictions are the deployed predictor's (``fitting_predictions``: the calibration rows when the
    split has them, at the stored temperature); ``fitted.referral`` records that predictor and the rows.
    ``tta`` None is the model's default TTA (all 8 dihedral views for a binary patch model).
    """
    bundle = read_bundle(run_dir)
    bundle.trust.referral = None  # the default TTA is the model's own, not an older rule's
    ks = tta_views(bundle, tta, "fit")
    fit = fitting_predictions(run_dir, ks, data, settings)  # calibration rows, else out-of-fold or validation
    rule = fit_referral(
        fit.probabilities,
        fit.labels,
        fit.uncertainty,
        threshold=bundle.threshold,
        tta=ks,
        coverage=coverage,
        target_accuracy=target_accuracy,
        target_sensitivity=target_sensitivity,
        delta=delta,
        by=by,
        fitted_on=fit.source,
    )
    bundle = read_bundle(run_dir)
    bundle.trust.referral = rule
    bundle.fitted.referral = fit.record
    bundle.inference.tta = list(fit.record.under.tta)  # what is fitted is what answers: the deployed views
    bundle.save(run_dir)
    return rule


def calibrate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    temperature: bool = True,
    refer_coverage: float | None = None,
    target_accuracy: float | None = None,
    target_sensitivity: float | None = None,
    delta: float = 0.05,
    refer_by: str = "probability",
    tissue_check: bool = False,
    ood: bool = False,
    settings: PredictorSettings | None = None,
) -> list[str]:
    """Calibrate a run, as ``histoscan calibrate`` does.

    ``histoscan calibrate``: fit the temperature, a referral rule (when a coverage, a target accuracy or a
    target sensitivity is given; a target with a guarantee at confidence 1 - ``delta``), the tissue check and
    the out-of-distribution detector (``ood``) of ``run_dir``, save them in model.json, and say what was
    fitted, one line each.

    ``settings``: how the model runs (device, precision, ...); its ``tta`` is the TTA policy both the
    temperature and the referral rule are fitted under (None: the model's default for each).
    """
    from histoscan.inference.calibration import calibrate
    from histoscan.rules.referral import describe
    from histoscan.trust.tissue import fit_run_tissue_check

    settings = settings or PredictorSettings()
    lines = []
    if temperature:
        r = calibrate(run_dir, data, settings.tta, settings)
        lines.append(
            f"temperature {r.temperature:.3f} on {r.count} patches ({r.source}): "
            f"NLL {r.nll_before:.4f} -> {r.nll_after:.4f}"
        )
    if any(v is not None for v in (refer_coverage, target_accuracy, target_sensitivity)):
        rule = fit_run_referral(
            run_dir,
            data,
            coverage=refer_coverage,
            target_accuracy=target_accuracy,
            target_sensitivity=target_sensitivity,
            delta=delta,
            by=refer_by,
            tta=settings.tta,
            settings=settings,
        )
        aurocs = ", ".join(f"{k} {v:.3f}" for k, v in rule.error_auroc.items())
        lines += [f"error-detection AUROC on {rule.fitted_on}: {aurocs}", describe(rule)]
    if tissue_check:
        check = fit_run_tissue_check(run_dir, data)
        lines.append(
            f"tissue check fitted on {check.count} training patches: Mahalanobis distance limit {check.threshold:.2f}"
        )
    if ood:
        from histoscan.trust.ood import describe as describe_ood
        from histoscan.trust.ood import fit_run_ood

        lines.append(describe_ood(fit_run_ood(run_dir, data, settings=settings)))
    return lines
