"""Which predictions a bundle's fitted values (temperature, threshold, referral band) are fitted on.

One rule for every fitted value, in this order:

1. The calibration rows of the bundle's split (``histoscan split --calibration``), when it has them:
   rows no member trained or early-stopped on (checked against each member's split file), scored by
   the bundle as deployed (an ensemble: the ensemble Predictor, every member, the TTA asked for).
2. An ensemble whose members are the folds of one cross-validation (``fitted_on: oof``) without
   calibration rows: its out-of-fold predictions, each non-test patch predicted by the one member that
   did not train on it. An approximation: single-member scores stand in for the ensemble's mean, and
   the validation fold already chose each fold's best epoch.
3. A single run without calibration rows: its validation split (on which it early-stopped).

Any other ensemble has no rows to fit on and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histoscan.bundle import EnsembleBundle, read_bundle
from histoscan.data.splits import CALIBRATION
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.inference.calibration_rows import RESPLIT, calibration_ids, check_unseen
from histoscan.inference.probabilities import logits_of, probabilities
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import parse_tta, tta_views
from histoscan.runfolder import FitRecord, FittedUnder, RunFolder


class FittingPredictions(NamedTuple):
    """Predictions that a calibration, threshold or trust rule is fitted on.

    Predictions to fit on: probabilities (N x C, at the bundle's current temperature), labels, the spread
    across views (None for one view), where they came from in words, and ``record``: the predictor they were
    made under and the rows (what ``model.json``'s ``fitted`` keeps for whatever is fitted on them).
    """

    probabilities: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray | None
    source: str
    record: FitRecord


def fitting_predictions(
    run_dir: str | Path,
    tta: bool | Sequence[int] | None = None,
    data: str | Path | None = None,
    settings: PredictorSettings | None = None,
) -> FittingPredictions:
    """The predictions ``run_dir``'s fitted values are chosen on (see the module text), under ``tta``.

    ``data``: the store holding the patches (default: the store the run trained on). Out-of-fold
    predictions come from single members, so their uncertainty is the TTA spread alone (None without
    TTA); an ensemble's own uncertainty also spreads across members. ``settings``: the device,
    precision, ... the model runs with (default: the torch backend on the CPU).
    """
    settings = settings or PredictorSettings()
    bundle = read_bundle(run_dir)
    views = tta_views(bundle, tta, "fit")  # the deployed predictor's views unless asked: what will answer
    run = RunFolder(run_dir)
    ids = calibration_ids(run.split_path)
    if ids:
        if isinstance(bundle, EnsembleBundle):
            check_unseen(bundle.member_dirs, ids)
        part, _ = run.select_patches(run.data_store(data), CALIBRATION)
        _check_labelled(part, "calibration")
        predictor = settings.predictor(run_dir, backend="torch")
        pred = predictor.predict_store(part, views)
        scorer = (
            f"scored by the ensemble of {len(bundle.member_dirs)} members as deployed"
            if isinstance(bundle, EnsembleBundle)
            else "scored by the model"
        )
        source = f"the {len(part)} calibration rows of {part.path} (no member trained or validated on them; {scorer})"
        record = FitRecord(under=predictor.under(views), split=CALIBRATION, rows=len(part))
        return FittingPredictions(pred.probabilities, part.labels, pred.uncertainty, source, record)
    if isinstance(bundle, EnsembleBundle):
        if bundle.fitted_on == "oof":
            return _out_of_fold(bundle, views, data, settings)
        raise ConfigError(
            f"{run.split_path}: ensemble {run_dir} has no calibration rows and its members are not the folds of one "
            f"cross-validation, so every row it could fit on trained or early-stopped a member; reserve some with "
            f"'{RESPLIT}', retrain the members on that split and write the ensemble again"
        )
    part, _ = run.select_patches(run.data_store(data), "val")
    _check_labelled(part, "validation")
    predictor = settings.predictor(run_dir, backend="torch")
    pred = predictor.predict_store(part, views)
    record = FitRecord(under=predictor.under(views), split="val", rows=len(part))
    source = (
        f"the validation split of {part.path} (the split has no calibration rows, so these are the rows the run "
        f"early-stopped on; '{RESPLIT}' reserves some)"
    )
    return FittingPredictions(pred.probabilities, part.labels, pred.uncertainty, source, record)


def _out_of_fold(
    bundle: EnsembleBundle, tta: bool | Sequence[int] | None, data: str | Path | None, settings: PredictorSettings
) -> FittingPredictions:
    """Each member (a fold) predicts its own validation fold; the ensemble's temperature applies on top."""
    probs, labels, spreads = [], [], []
    store = None
    precision = None
    for member in bundle.member_dirs:
        run = RunFolder(member)
        part, _ = run.select_patches(run.data_store(data), "val")
        _check_labelled(part, "out-of-fold")
        store = part.path
        predictor = settings.predictor(member, backend="torch")
        precision = predictor.precision
        pred = predictor.predict_store(part, tta)
        probs.append(pred.probabilities)
        labels.append(part.labels)
        spreads.append(pred.uncertainty)
    p = np.concatenate(probs)
    if bundle.temperature != 1.0:
        p = probabilities(logits_of(p), bundle.temperature)
    unc = np.concatenate([s for s in spreads if s is not None]) if len(parse_tta(tta)) > 1 else None
    source = (
        f"out-of-fold predictions of the {len(bundle.member_dirs)} folds of {store} (an approximation: "
        "single-member scores, not the ensemble's mean; no calibration rows)"
    )
    # single members answered these rows: the record says so (members 1), so the ensemble's answers under all its
    # members are reported as fitted under another predictor, an approximation
    under = FittedUnder(tta=parse_tta(tta), members=1, precision=precision)  # type: ignore[arg-type]
    record = FitRecord(under=under, split="oof", rows=len(p))
    return FittingPredictions(p, np.concatenate(labels), unc, source, record)


def _check_labelled(part: PatchStore, what: str) -> None:
    if len(part) == 0:
        raise DataError(f"{part.path}: no {what} patches to fit on")
    if not part.labelled or (part.labels < 0).any():
        raise DataError(f"{part.path}: the {what} patches are unlabelled; fitting needs labels")
