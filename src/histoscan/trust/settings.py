"""Options of ``histoscan calibrate``.

Options of ``histoscan calibrate`` (each field's help text is its ``--help``); its model options are
``histoscan.inference.settings.PredictorSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class CalibrateSettings:
    """``histoscan calibrate``: what to fit on a run's validation data."""

    run: Path = doc("A run folder.", argument=True)
    data: Path | None = doc("Store holding the run's validation patches (default: the training store).", None)
    temperature: bool = doc(
        "Fit temperature scaling on the calibration rows of the run's split (else the validation split).", True
    )
    refer_coverage: float | None = doc(
        "Fit a referral rule answering this fraction of images (the rest: 'refer'), e.g. 0.9.", None
    )
    target_accuracy: float | None = doc(
        "Fit a referral rule whose answered images reach this accuracy (guaranteed at 1 - delta), e.g. 0.98.", None
    )
    refer_sensitivity: float | None = doc(
        "Fit a referral rule whose answered tumour images reach this sensitivity (guaranteed at 1 - delta; binary "
        "models), e.g. 0.98.",
        None,
    )
    delta: float = doc(
        "A target's guarantee holds with confidence 1 - delta over the fitting rows (Learn-then-Test).", 0.05
    )
    refer_by: str = doc(
        "Refer by probability (the calibrated margin from the threshold), uncertainty, or auto (the better on the "
        "fitting rows).",
        "probability",
    )
    tissue_check: bool = doc(
        "Fit the tissue check (not tissue / out of distribution) on the training split (new runs have it).", False
    )
    ood: bool = doc(
        "Fit the out-of-distribution detector (pooled-feature distances from the training split; threshold: 99% of "
        "validation rows) into ood.safetensors.",
        False,
    )
