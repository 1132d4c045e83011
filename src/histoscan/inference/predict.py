"""Batch prediction to a CSV, and Kaggle submissions of probabilities."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histoscan.data.sources.kaggle import read_id_table
from histoscan.errors import DataError
from histoscan.inference.inputs import input_batches
from histoscan.inference.predictor import Prediction, Predictor
from histoscan.system import available_cores


@dataclass
class PredictionTable:
    """Predictions with their ids, and the inputs that could not be read."""

    ids: list[str]
    prediction: Prediction
    classes: list[str]
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """id, prob_<class>..., predicted[, uncertainty]."""
        df = pd.DataFrame({"id": self.ids})
        for j, name in enumerate(self.classes):
            df[f"prob_{name}"] = self.prediction.probabilities[:, j]
        df["predicted"] = [self.classes[k] for k in self.prediction.predicted]
        if self.prediction.uncertainty is not None:
            df["uncertainty"] = self.prediction.uncertainty
        return df


def predict_input(
    predictor: Predictor,
    path: str | Path,
    *,
    tta: bool | Sequence[int] | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PredictionTable:
    """Predict every image of ``path`` (image, folder, Kaggle test folder, store, PCam file or folder)."""
    workers = workers if workers is not None else available_cores()
    ids: list[str] = []
    parts: list[Prediction] = []
    failures: list[tuple[str, str, str]] = []
    for batch in input_batches(path, predictor.bundle.preprocessing, predictor.batch_size, workers):
        failures.extend(batch.failures)
        if len(batch.ids):
            parts.append(predictor.predict_batch(batch.images, tta))
            ids.extend(batch.ids)
        if progress:
            progress(len(batch.ids) + len(batch.failures))
    if not ids:
        first = f" (first failure: {failures[0][1]}: {failures[0][2]})" if failures else ""
        raise DataError(f"{path}: no readable images{first}")
    return PredictionTable(ids, Prediction.concat(parts, len(predictor.classes)), predictor.classes, failures)


def write_predictions(table: PredictionTable, out: str | Path) -> tuple[Path, Path | None]:
    """Write the CSV, and ``<out>.errors.csv`` listing unreadable inputs when there are any."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.frame().to_csv(out, index=False)
    errors = None
    if table.failures:
        errors = out.with_name(out.stem + ".errors.csv")
        with errors.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "path", "reason"])
            w.writerows(table.failures)
    return out, errors


def write_submission(table: PredictionTable, sample: str | Path, out: str | Path, positive: str | None = None) -> Path:
    """Kaggle ``id,label`` in the sample file's order, where label is the tumour PROBABILITY.

    The competition ranks by AUROC; hard 0/1 labels would throw the ranking away. Every id of the
    sample file must have a prediction, else DataError names the missing ones.
    """
    rows, duplicates = read_id_table(Path(sample), need_label=False)
    if duplicates:
        raise DataError(f"{sample}: duplicate ids {duplicates[:5]}")
    if len(table.classes) != 2 and positive is None:
        raise DataError("a Kaggle submission needs a binary model (or name the positive class)")
    col = table.classes.index(positive) if positive else 1
    prob = dict(zip(table.ids, table.prediction.probabilities[:, col]))
    missing = [pid for pid, _, _ in rows if pid not in prob]
    if missing:
        unreadable = {f[0] for f in table.failures}
        why = [f"{m} ({'unreadable' if m in unreadable else 'no image'})" for m in missing[:5]]
        raise DataError(
            f"{sample}: {len(missing)} ids have no prediction: {', '.join(why)}" + (" ..." if len(missing) > 5 else "")
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        w.writerows((pid, f"{float(prob[pid]):.6f}") for pid, _, _ in rows)
    return out
