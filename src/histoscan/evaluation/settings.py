"""Options of ``histoscan evaluate`` and ``histoscan compare``.

Options of ``histoscan evaluate`` and ``histoscan compare`` (each field's help text is its ``--help``); the
model options of ``evaluate`` are ``histoscan.inference.settings.PredictorSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histoscan.options import doc


@dataclass(frozen=True)
class EvaluateSettings:
    """``histoscan evaluate``: score a run on a labelled split."""

    run: Path = doc("A run folder.", argument=True)
    data: Path | None = doc("Labelled store (default: the store the run trained on).", None)
    split: str | None = doc(
        "test, val, train or all (default: test of the training store, all of another store).", None
    )
    target_sensitivity: list[float] = doc(
        "Report the threshold reaching this sensitivity (repeatable).", [0.95], multiple=True
    )
    save_threshold: str | None = doc(
        "youden or sensitivity: choose a threshold on the validation split and save it in model.json.", None
    )
    out: Path | None = doc("Output folder (default: RUN/eval for the run's test split).", None)
    bootstrap: int = doc("Bootstrap resamples for the AUROC interval.", 1000)
    labels: Path | None = doc("Deprecated: use 'histoscan slide evaluate'.", None, hidden=True)
    stain_shift: bool = doc(
        "Also score the split under the fixed stain-shift suite (AUROC per shift, worst drop).", False
    )
    stain_donor: list[Path] = doc(
        "A store or image folder whose fitted stain re-stains the patches as one more shift (repeatable).",
        [],
        multiple=True,
    )


@dataclass(frozen=True)
class CompareSettings:
    """``histoscan compare``: rank runs in one leaderboard."""

    runs: list[Path] = doc("Run folders, or folders holding runs (runs/, a baselines folder, a study).", argument=True)
    metric: str = doc("auroc, average_precision, accuracy, balanced_accuracy, f1, brier or ece.", "auroc")
    out: Path = doc("Folder for leaderboard.csv/.md/.html (and selection.json).", Path("leaderboard"))
    select: bool = doc("Write which run is best and why (selection.json).", False, flags="--select")
    evaluate_missing: bool = doc("Evaluate runs that have no eval/ yet on their test split.", True)
