"""Which predictions a bundle's fitted values (temperature, threshold, referral band) are fitted on.

One rule for every fitted value: an ensemble whose members are the folds of one cross-validation
(``fitted_on: oof``) is fitted on its out-of-fold predictions, each non-test patch predicted by the
one member that did not train on it (its validation fold); every other run, single or ensemble, on
its validation split (an ensemble's is its first member's). The validation split already chose each
fold's best epoch, so the out-of-fold predictions are slightly optimistic, as a run's validation
predictions are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histoscan.bundle import EnsembleBundle, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from histoscan.inference.probabilities import logits_of, probabilities
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import parse_tta
from histoscan.runfolder import RunFolder


class FittingPredictions(NamedTuple):
    """Predictions to fit on: probabilities (N x C, at the bundle's current temperature), labels, the spread
    across views (None for one view), and where they came from, in words."""

    probabilities: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray | None
    source: str


def fitting_predictions(
    run_dir: str | Path,
    tta: bool | Sequence[int] | None = None,
    data: str | Path | None = None,
    settings: PredictorSettings | None = None,
) -> FittingPredictions:
    """The predictions ``run_dir``'s fitted values are chosen on (see the module text), under ``tta``.

    ``data``: the store holding the validation patches (default: the store the run trained on).
    Out-of-fold predictions come from single members, so their uncertainty is the TTA spread alone
    (None without TTA); an ensemble's own uncertainty also spreads across members. ``settings``: the device,
    precision, ... the model runs with (default: the torch backend on the CPU).
    """
    settings = settings or PredictorSettings()
    bundle = read_bundle(run_dir)
    if isinstance(bundle, EnsembleBundle) and bundle.fitted_on == "oof":
        return _out_of_fold(bundle, tta, data, settings)
    run = RunFolder(run_dir)
    part, _ = run.select_patches(run.data_store(data), "val")
    _check_labelled(part, "validation")
    pred = settings.predictor(run_dir, backend="torch").predict_store(part, tta)
    return FittingPredictions(pred.probabilities, part.labels, pred.uncertainty, f"the validation split of {part.path}")


def _out_of_fold(
    bundle: EnsembleBundle, tta: bool | Sequence[int] | None, data: str | Path | None, settings: PredictorSettings
) -> FittingPredictions:
    """Each member (a fold) predicts its own validation fold; the ensemble's temperature applies on top."""
    probs, labels, spreads = [], [], []
    store = None
    for member in bundle.member_dirs:
        run = RunFolder(member)
        part, _ = run.select_patches(run.data_store(data), "val")
        _check_labelled(part, "out-of-fold")
        store = part.path
        pred = settings.predictor(member, backend="torch").predict_store(part, tta)
        probs.append(pred.probabilities)
        labels.append(part.labels)
        spreads.append(pred.uncertainty)
    p = np.concatenate(probs)
    if bundle.temperature != 1.0:
        p = probabilities(logits_of(p), bundle.temperature)
    unc = np.concatenate([s for s in spreads if s is not None]) if len(parse_tta(tta)) > 1 else None
    return FittingPredictions(
        p, np.concatenate(labels), unc, f"out-of-fold predictions of the {len(bundle.member_dirs)} folds of {store}"
    )


def _check_labelled(part: PatchStore, what: str) -> None:
    if len(part) == 0:
        raise DataError(f"{part.path}: no {what} patches to fit on")
    if not part.labelled or (part.labels < 0).any():
        raise DataError(f"{part.path}: the {what} patches are unlabelled; fitting needs labels")
