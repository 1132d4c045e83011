"""Batch prediction to a CSV, and Kaggle submissions of probabilities."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from histoscan.bundle import MODEL_FILE
from histoscan.data.sources.kaggle import read_id_table
from histoscan.data.store import META_FILE as STORE_META
from histoscan.data.store import PatchStore
from histoscan.errors import DataError
from histoscan.inference.inputs import Batch, input_batches
from histoscan.inference.predictor import Prediction, Predictor
from histoscan.inference.settings import PredictorSettings
from histoscan.inference.tta import tta_views
from histoscan.rules.answers import check_policy
from histoscan.system import available_cores


@dataclass
class PredictionTable:
    """Predictions with their ids, and the inputs that could not be read."""

    ids: list[str]
    prediction: Prediction
    classes: list[str]
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    settings: dict[str, object] | None = None  # what produced them (``Predictor.settings_record``)

    def frame(self) -> pd.DataFrame:
        """id, prob_<class>..., predicted, answer, quality[, uncertainty][, ood_score].

        ``answer`` is the class, ``refer``, ``not tissue`` or ``out of distribution``; ``quality`` is the tissue
        check's flag (``ok``, what is wrong, or ``unchecked`` for a run without the check); ``ood_score``: the
        out-of-distribution detector's score, when the run has one (``trust.ood``).
        """
        df = pd.DataFrame({"id": self.ids})
        for j, name in enumerate(self.classes):
            df[f"prob_{name}"] = self.prediction.probabilities[:, j]
        df["predicted"] = [self.classes[k] for k in self.prediction.predicted]
        if self.prediction.answers is not None:
            df["answer"] = self.prediction.answers
        if self.prediction.quality is not None:
            df["quality"] = self.prediction.quality
        if self.prediction.uncertainty is not None:
            df["uncertainty"] = self.prediction.uncertainty
        if self.prediction.ood is not None:
            df["ood_score"] = self.prediction.ood
        return df


def predict_input(
    predictor: Predictor,
    path: str | Path,
    *,
    tta: bool | Sequence[int] | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> PredictionTable:
    """Predict every image of ``path`` (image, folder, Kaggle test folder, store, PCam file or folder).

    A per-group stain model maps a store's patches by their group (patient / slide); any other
    input is one group, its stain estimated from the first batch read: ``notice`` says which.
    ``tta`` None is the referral rule's policy when model.json has one; other views are then a ConfigError.
    """
    workers = workers if workers is not None else available_cores()
    views = predictor.tta_views(tta)
    check_policy(predictor.bundle.trust, views, str(predictor.run_dir / MODEL_FILE))
    for line in predictor.fitted_notices(views):  # fitted under another predictor: said, never silent
        (notice or (lambda _: None))(line)
    ids: list[str] = []
    parts: list[Prediction] = []
    failures: list[tuple[str, str, str]] = []
    groups = input_stain_groups(predictor, Path(path), notice)
    for batch in input_batches(path, predictor.bundle.preprocessing, predictor.batch_size, workers):
        failures.extend(batch.failures)
        if len(batch.ids):
            g = groups.of(batch, predictor) if groups is not None else None
            parts.append(predictor.predict_batch(batch.images, tta, g))
            ids.extend(batch.ids)
        if progress:
            progress(len(batch.ids) + len(batch.failures))
    if not ids:
        first = f" (first failure: {failures[0][1]}: {failures[0][2]})" if failures else ""
        raise DataError(f"{path}: no readable images{first}")
    return PredictionTable(
        ids,
        Prediction.concat(parts, len(predictor.classes)),
        predictor.classes,
        failures,
        predictor.settings_record(views),
    )


#: the stain group of every image of an input that is not a store with groups (per-group stain models)
INPUT_GROUP = "input"


@dataclass
class InputStainGroups:
    """Stain groups for a per-group model's input: a store's own (``names``, in order) or one group for all."""

    names: np.ndarray | None
    done: int = 0

    def of(self, batch: Batch, predictor: Predictor) -> np.ndarray:
        """The groups of the next batch read (the first batch of a group-less input estimates its one group)."""
        n = len(batch.ids)
        if self.names is not None:
            out = self.names[self.done : self.done + n]
        else:
            pre = predictor.bundle.preprocessing
            if INPUT_GROUP not in pre.stain_groups:  # the first batch read: the whole input's estimate
                pre.estimate_stain_groups(np.full(n, INPUT_GROUP), lambda pos: batch.images[pos])
            out = np.full(n, INPUT_GROUP)
        self.done += n
        return out


def input_stain_groups(
    predictor: Predictor, path: Path, notice: Callable[[str], None] | None = None
) -> InputStainGroups | None:
    """Per-group stain models: the stain groups of ``path`` (a store's groups, else one for all); None otherwise."""
    pre = predictor.bundle.preprocessing
    if not pre.per_group:
        return None
    say = notice or (lambda _: None)
    if path.is_dir() and (path / STORE_META).is_file():
        store = PatchStore(path)
        names = pre.estimate_store_groups(store) if store.groups is not None else None
        if names is not None:
            say(f"stain: per-group model: each patch mapped by its group's stain ({len(set(names.tolist()))} groups)")
            return InputStainGroups(names)
    say(
        f"stain: per-group model: {path} has no groups, so the whole input is one group, its stain estimated "
        "from the first batch read"
    )
    return InputStainGroups(None)


def check_output(out: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """``out`` when writing it destroys nothing, else DataError saying why.

    Never an input (the file itself, or an existing file inside an input folder), never an
    existing file of a packed store or a run folder (even with ``force``), and an existing
    output only with ``force``.
    """
    target = Path(out).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if target == src or (target.exists() and src.is_dir() and src in target.parents):
            raise DataError(f"{out}: is an input of this command; choose another --out")
    if target.exists():
        folder = target.parent
        if (folder / STORE_META).is_file() or (folder / MODEL_FILE).is_file():
            what = "a packed store" if (folder / STORE_META).is_file() else "a run folder"
            raise DataError(f"{out}: is a file of {what} ({folder}); choose another --out")
        if not force:
            raise DataError(f"{out}: already exists; pass --force to replace it")
        if target.is_dir():
            raise DataError(f"{out}: is a folder; --out names a CSV file")
    return target


def write_predictions(
    table: PredictionTable, out: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()
) -> tuple[Path, Path | None]:
    """Write the CSV, ``<out>.json`` naming what produced it, and ``<out>.errors.csv`` for unreadable inputs.

    All are written atomically (a temporary file renamed into place); an errors file left by an
    earlier run is removed when this run has none, so it always describes the CSV beside it.
    """
    out = check_output(out, force, inputs)
    errors = out.with_name(out.stem + ".errors.csv")
    if table.failures:
        check_output(errors, True, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, lambda fh: table.frame().to_csv(fh, index=False))
    if table.settings is not None:  # the predictor settings, threshold and fitted records behind every row
        _atomic_write(out.with_name(out.name + ".json"), lambda fh: json.dump(table.settings, fh, indent=2))
    if not table.failures:
        errors.unlink(missing_ok=True)
        return out, None

    def write_errors(fh: TextIO) -> None:
        w = csv.writer(fh)
        w.writerow(["id", "path", "reason"])
        w.writerows(table.failures)

    _atomic_write(errors, write_errors)
    return out, errors


def _atomic_write(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_submission(
    table: PredictionTable,
    sample: str | Path,
    out: str | Path,
    positive: str | None = None,
    *,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
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
    target = check_output(out, force, [*inputs, sample])
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(fh: TextIO) -> None:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        w.writerows((pid, f"{float(prob[pid]):.6f}") for pid, _, _ in rows)

    _atomic_write(target, write)
    return Path(out)


def predict_files(
    run: str | Path,
    input: str | Path,
    *,
    out: str | Path = "predictions.csv",
    submission: str | Path | None = None,
    submission_out: str | Path = "submission.csv",
    workers: int | None = None,
    force: bool = False,
    settings: PredictorSettings | None = None,
    progress: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> list[str]:
    """Predict every image of an input and write the predictions CSV.

    ``histoscan predict``: predict every image of ``input`` with the bundle ``run`` and write the predictions
    CSV (and a Kaggle submission in the order of the ``submission`` sample); returns what happened, in lines.

    ``settings``: how the model runs; its ``tta`` None is the default for a submission or for prediction
    (``histoscan.inference.tta``). An existing ``out`` is
    refused before any work unless ``force``.
    """
    settings = settings or PredictorSettings()
    check_output(out, force, [input, run])  # before the work, not after it
    predictor = settings.predictor(run)
    tta = tta_views(predictor.bundle, settings.tta, "submission" if submission else "predict")
    table = predict_input(predictor, input, tta=tta, workers=workers, progress=progress, notice=notice)
    path, errors = write_predictions(table, out, force=force, inputs=[input, run])
    lines = [f"{len(table.ids)} predictions ({predictor.backend.name} backend) written to {path}"]
    if errors:
        lines.append(f"[yellow]{len(table.failures)} unreadable inputs listed in {errors}[/]")
    if submission:
        written = write_submission(table, submission, submission_out, force=force, inputs=[input, run])
        lines.append(f"submission written to {written}")
    return lines
