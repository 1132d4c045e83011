"""``histoscan ensemble``: write an ensemble bundle from trained runs.

The bundle is a folder with ``model.json`` (``kind: ensemble``: the members, relative to the folder
or copied into it, their weights, ``combine: mean`` of probabilities, a threshold and which
predictions it was chosen on) and ``split.csv`` (which patches the ensemble may be scored on, and its
calibration rows: the rows no member trained or validated on, where its threshold is fitted).
Everything is checked here, once: a member that is missing, of another task, with other classes, at
another resolution or image geometry, or an ensemble itself is one line naming it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoscan import __version__
from histoscan.bundle import ModelBundle, read_bundle, read_member
from histoscan.data.splits import CALIBRATION, read_split
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.inference.calibration_rows import RESPLIT, calibration_ids, check_unseen
from histoscan.inference.fitting import fitting_predictions
from histoscan.inference.tta import default_views
from histoscan.metrics import pick_threshold
from histoscan.runfolder import (
    SPLIT_FILE,
    EnsembleDocument,
    EnsembleMember,
    FittedRecords,
    InferencePolicy,
    RunFolder,
)

MEMBERS_DIR = "members"  # where --copy puts the members' run folders


@dataclass
class EnsembleResult:
    """What was written."""

    path: Path
    members: list[Path]
    fitted_on: str
    threshold: float
    threshold_source: str

    def lines(self) -> list[str]:
        """What was written, for the terminal."""
        return [
            f"ensemble of {len(self.members)} runs written to {self.path}",
            f"threshold {self.threshold:.4f} chosen on {self.threshold_source}",
        ]


def make_ensemble(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    copy: bool = False,
    weights: Sequence[float] | None = None,
    oof: str | Path | None = None,
    threshold_rule: str = "youden",
    force: bool = False,
    printer: Callable[[str], None] = lambda _: None,
) -> EnsembleResult:
    """Write an ensemble of ``runs`` to ``out`` and choose its threshold (binary tasks).

    The threshold is chosen by ``threshold_rule`` (``youden``, ``sensitivity`` at 0.95, or ``none`` to keep
    0.5) on the calibration rows of the members' split (``histoscan split --calibration``), scored by the
    ensemble as deployed (every member, its default TTA); every member's split file must keep those rows
    out of its training and validation rows. Without calibration rows, the folds of one cross-validation
    fit on out-of-fold predictions (``oof``, an ``oof.csv`` of ``histoscan train --folds``, when given),
    labelled an approximation; any other ensemble is refused unless ``threshold_rule`` is ``none``.
    """
    if threshold_rule not in ("youden", "sensitivity", "none"):
        raise ConfigError(f"--threshold-rule {threshold_rule!r} is not one of youden, sensitivity, none")
    out = Path(out)
    if (out / "model.json").exists() and not force:
        raise ConfigError(f"{out}: a model already exists there; choose another --out or pass --force")
    dirs = [Path(r) for r in runs]
    if len(dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 runs, got {len(dirs)}")
    if weights is not None and len(weights) != len(dirs):
        raise ConfigError(f"--member-weights: {len(weights)} weights for {len(dirs)} runs")
    if weights is not None and any(not (w > 0) for w in weights):
        raise ConfigError(f"--member-weights must be positive numbers, got {list(weights)}")
    bundles = [_member(d) for d in dirs]
    for d, b in zip(dirs[1:], bundles[1:]):
        check_compatible(dirs[0], bundles[0], d, b)
    cv = folds_of_one_cv(dirs)
    if not cv:
        _check_same_test(dirs)
    ids = set().union(*(calibration_ids(RunFolder(d).split_path) for d in dirs))
    check_unseen(dirs, ids)  # no calibration row in any member's training or validation rows
    fits = threshold_rule != "none" and bundles[0].task == "binary"
    fitted_on = CALIBRATION if ids else ("oof" if cv else "validation")
    if fitted_on == "validation" and fits:
        raise ConfigError(
            f"{RunFolder(dirs[0]).split_path}: these members are not the folds of one cross-validation and their "
            "split has no calibration rows, so every row the ensemble could fit its threshold on trained or "
            f"early-stopped a member; reserve some with '{RESPLIT}' and retrain the members on that split (or "
            "pass --threshold-rule none to keep 0.5)"
        )
    out.mkdir(parents=True, exist_ok=True)
    RunFolder(out).onnx_path.unlink(missing_ok=True)  # a graph of the members this replaces would be stale
    members = _place(dirs, out, copy)
    _write_split(dirs, out, cv, ids)
    doc = EnsembleDocument(
        members=[EnsembleMember(run=m, weight=float(w)) for m, w in zip(members, weights or [1.0] * len(dirs))],
        classes=list(bundles[0].classes),
        fitted_on=fitted_on,  # type: ignore[arg-type]
        fitted_rows=len(ids) or None,
        histoscan_version=__version__,
    )
    RunFolder(out).write_model_json(doc)
    threshold, source = 0.5, "nothing (threshold rule none: the default 0.5)"
    if fits:
        if oof is not None and not ids:
            scores, labels, source = _read_oof(Path(oof), bundles[0].classes)
        else:
            printer(f"choosing the threshold ({threshold_rule}) on the ensemble's {fitted_on} predictions ...")
            fit = fitting_predictions(out, default_views(read_bundle(out), "fit"))
            scores, labels, source = fit.probabilities[:, 1], fit.labels, fit.source
            doc = doc.model_copy(
                update={
                    "fitted_rows": len(labels) if ids else None,
                    "fitted": FittedRecords(threshold=fit.record),
                    "inference": InferencePolicy(tta=list(fit.record.under.tta)),
                }
            )
        threshold = pick_threshold(labels, scores, threshold_rule, source=source)
        RunFolder(out).write_model_json(
            doc.model_copy(update={"threshold": threshold, "threshold_rule": f"{threshold_rule} on {source}"})
        )
    return EnsembleResult(out, dirs, fitted_on, threshold, source)


def parse_weights(text: str | None) -> list[float] | None:
    """``--member-weights 1,1,2`` as numbers (None when not given)."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--member-weights: {text!r} is not a comma-separated list of numbers") from None


def _member(run: Path) -> ModelBundle:
    if not run.is_dir():
        raise ConfigError(f"member {run}: no such run folder")
    bundle = read_member(run)
    if bundle.preprocessing.per_group:  # each member would need its own group estimates in every consumer
        raise ConfigError(
            f"member {run}: normalises stain per group (patient or slide); an ensemble takes members that "
            "normalise per patch or not at all (train them with --stain-granularity patch)"
        )
    return bundle


def check_compatible(first_dir: Path, first: ModelBundle, run: Path, b: ModelBundle) -> None:
    """ConfigError naming ``run`` unless it predicts the same task and classes at the same resolution and geometry."""
    if b.task != first.task:
        raise ConfigError(
            f"member {run}: a {b.task} model, but {first_dir} is {first.task}; an ensemble needs one task"
        )
    if b.classes != first.classes:
        raise ConfigError(f"member {run}: classes {b.classes}, but {first_dir} has {first.classes}")
    p, q = b.preprocessing, first.preprocessing
    if p.mpp != q.mpp:
        raise ConfigError(f"member {run}: trained at {p.mpp} um/px, but {first_dir} at {q.mpp} um/px")
    for name in ("image_size", "fit", "label_size"):
        if getattr(p, name) != getattr(q, name):
            raise ConfigError(
                f"member {run}: preprocessing.{name} {getattr(p, name)}, but {first_dir} has {getattr(q, name)} "
                "(members must take the same images; crop, resize and normalisation may differ)"
            )


def _assignments(dirs: Sequence[Path]) -> list[tuple[PatchStore, np.ndarray]] | None:
    """Each member's train/val/test assignment over its training store, or None when one lacks it or stores differ."""
    out = []
    for d in dirs:
        run = RunFolder(d)
        store = run.training_store()
        if store is None or not run.split_path.is_file() or not (store / "meta.json").is_file():
            return None
        out.append((PatchStore(store), read_split(run.split_path, PatchStore(store))))
    if len({s.path.resolve() for s, _ in out}) != 1:
        return None
    return out


def folds_of_one_cv(dirs: Sequence[Path]) -> bool:
    """Whether the runs are the folds of one cross-validation.

    True when the runs are the folds of one cross-validation over one store: the same test rows, validation
    folds that do not overlap and that together cover every other row.
    """
    parts = _assignments(dirs)
    if parts is None:
        return False
    test, reserved = parts[0][1] == "test", parts[0][1] == CALIBRATION
    seen = np.zeros(len(test), dtype=np.int64)
    for _, a in parts:
        if not (np.array_equal(a == "test", test) and np.array_equal(a == CALIBRATION, reserved)):
            return False
        seen += a == "val"
    return bool(np.all(seen[~test & ~reserved] == 1))


def _check_same_test(dirs: Sequence[Path]) -> None:
    """Members on one store must hold out the same test rows, or scoring the ensemble there would score training data."""
    parts = _assignments(dirs)
    if parts is None:
        return
    test = parts[0][1] == "test"
    for d, (_, a) in zip(dirs[1:], parts[1:]):
        if not np.array_equal(a == "test", test):
            raise DataError(
                f"member {d}: its test split differs from {dirs[0]}'s, so the ensemble has no test split that none "
                "of its members trained on (train the members on one split or folds file)"
            )


def _place(dirs: Sequence[Path], out: Path, copy: bool) -> list[str]:
    """Members as model.json lists them: copied into OUT/members/ with ``copy``, else relative to OUT."""
    if not copy:
        return [os.path.relpath(d.resolve(), out.resolve()) for d in dirs]
    names = []
    for i, d in enumerate(dirs):
        name = f"{MEMBERS_DIR}/{i}-{d.resolve().name}"
        dest = out / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(d, dest, ignore=shutil.ignore_patterns("last.ckpt", "tensorboard", "eval*"))
        names.append(name)
    return names


def _write_split(dirs: Sequence[Path], out: Path, cv: bool, calibration: set[str]) -> None:
    """Write the ensemble's split.csv.

    The ensemble's split.csv: folds of one CV score only the test rows (every other row trained some member);
    other members share the first member's split. The calibration rows of any member are calibration here.
    """
    first = RunFolder(dirs[0]).split_path
    if not first.is_file():
        return
    frame = pd.read_csv(first, dtype=str, keep_default_na=False)
    if cv:
        frame["split"] = np.where(frame["split"].isin(["test", CALIBRATION]), frame["split"], "train")
    frame.loc[frame["id"].isin(calibration), "split"] = CALIBRATION
    frame.to_csv(out / SPLIT_FILE, index=False)


def _read_oof(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """P(positive) and labels of an ``oof.csv``."""
    if not path.is_file():
        raise DataError(f"{path}: out-of-fold predictions not found")
    frame = pd.read_csv(path)
    column = f"prob_{classes[1]}"
    missing = [c for c in ("label", column) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (expected id,label,fold,prob_<class>...)")
    labels = frame["label"].map({c: i for i, c in enumerate(classes)})
    if labels.isna().any():
        raise DataError(f"{path}: label values other than {list(classes)}")
    source = f"the out-of-fold predictions in {path} (an approximation: single-member scores, no calibration rows)"
    return frame[column].to_numpy(np.float64), labels.to_numpy(np.int64), source
