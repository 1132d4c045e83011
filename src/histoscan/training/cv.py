"""Cross-validation: ``histoscan train --folds K``.

Layout of ``OUT/<name>/``::

    folds.csv       id,fold (a fold number, or test): the folds 'histoscan split --folds K' writes
    fold-<i>/       a normal run folder per fold (fold i validates, the other folds train; test stays out)
    oof.csv         id,label,fold,prob_<class>...: each non-test patch predicted by the fold that did not train on it
    cv.json         mean and standard deviation of each fold's metrics, and the out-of-fold AUROC
    ensemble/       an ensemble bundle of the K folds (threshold chosen on the calibration rows, scored by the
                    ensemble, when the split reserves them (--calibration); else on the out-of-fold predictions)

Folds that already finished are never trained again: ``--fold I`` trains one fold (a job array can
spread them), and a later ``train --folds K --name N`` trains only the missing folds and then writes
oof.csv, cv.json and the ensemble.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoscan.data.splits import fold_assignment
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.runfolder import RunFolder, atomic_write_text
from histoscan.training.config import TrainConfig

if TYPE_CHECKING:
    from histoscan.inference.settings import PredictorSettings

FOLDS_FILE = "folds.csv"
OOF_FILE = "oof.csv"
CV_FILE = "cv.json"
ENSEMBLE_DIR = "ensemble"


def fold_dir(cv_dir: Path, i: int) -> Path:
    """The run folder of fold ``i``."""
    return cv_dir / f"fold-{i}"


@dataclass
class CVResult:
    """Where the cross-validation is and what it scored (``summary`` empty until every fold has finished)."""

    cv_dir: Path
    trained: list[int]
    reused: list[int]
    summary: dict[str, Any] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """What the cross-validation did, for the terminal."""
        lines = [f"folds trained now: {self.trained or 'none'}; reused: {self.reused or 'none'}"]
        if self.summary:
            s = self.summary
            lines.append(
                f"out-of-fold AUROC {s['oof']['auroc']:.4f} on {s['oof']['patches']} patches; "
                f"best val AUROC per fold {s['metrics']['best_val_auroc']['mean']:.4f} "
                f"+/- {s['metrics']['best_val_auroc']['std']:.4f}"
            )
            lines.append(f"cross-validation folder: {self.cv_dir} ({OOF_FILE}, {CV_FILE}, {ENSEMBLE_DIR}/)")
        else:
            lines.append(f"{self.cv_dir}: run the remaining folds (or 'train --folds K --name N') to collect them")
        return lines


def finished(run_dir: Path) -> bool:
    """A fold whose training ended: weights saved and the best metric recorded."""
    run = RunFolder(run_dir)
    return run.is_model and run.weights_path.is_file() and bool(run.read_model_json().best_metric)


def train_folds(
    cfg: TrainConfig,
    printer: Callable[[str], None] = print,
    ensemble: bool = True,
    settings: PredictorSettings | None = None,
) -> CVResult:
    """Train the folds of a cross-validation and their ensemble.

    Train the folds of ``cfg.folds``-fold cross-validation (only ``cfg.fold`` when set) and, once every fold
    has finished, write oof.csv, cv.json and the folds' ensemble.

    ``settings``: how the folds predict their out-of-fold patches (device, precision, batch size, threads, TTA;
    default: the torch backend on the CPU with each fold's default TTA), as in ``collect_folds``.
    """
    from histoscan.data.splits import save_split
    from histoscan.training.fit import train

    k = cfg.folds
    if k is None or k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}")
    if not cfg.data:
        raise ConfigError("no training data: give --data STORE (or 'data:' in the config)")
    name = cfg.name or f"{cfg.model}-cv{k}"
    cv_dir = Path(cfg.out) / name
    store = PatchStore(cfg.data)
    assignment, folds_name = fold_assignment(
        store, k, val=cfg.val, test=cfg.test, seed=cfg.seed, calibration=cfg.calibration
    )
    folds_path = _same_or_new(store, assignment, folds_name, save_split)
    cv_dir.mkdir(parents=True, exist_ok=True)
    own = cv_dir / FOLDS_FILE
    if own.is_file() and not np.array_equal(read_split_raw(own, store), assignment):
        raise DataError(
            f"{own}: these folds differ from the folds of {cfg.data} with seed {cfg.seed}, val {cfg.val}, "
            f"test {cfg.test}, calibration {cfg.calibration}; use the options this cross-validation started with, "
            "or another --name"
        )
    pd.read_csv(folds_path, dtype=str).to_csv(own, index=False)
    todo = [cfg.fold] if cfg.fold is not None else list(range(k))
    if any(i >= k for i in todo):
        raise ConfigError(f"fold {cfg.fold} does not exist: {k} folds are numbered 0..{k - 1}")
    trained, reused = [], []
    for i in todo:
        run_dir = fold_dir(cv_dir, i)
        if finished(run_dir):
            reused.append(i)
            continue
        printer(f"fold {i} of {k}")
        fold_cfg = cfg.replace(out=str(cv_dir), name=run_dir.name, split_file=str(folds_path), fold=i, folds=None)
        train(fold_cfg, printer=printer)
        trained.append(i)
    result = CVResult(cv_dir, trained, reused)
    if all(finished(fold_dir(cv_dir, i)) for i in range(k)):
        result.summary = collect_folds(cv_dir, k, ensemble=ensemble, printer=printer, settings=settings)
    return result


def train_run(
    cfg: TrainConfig, printer: Callable[[str], None] = print, settings: PredictorSettings | None = None
) -> Any:
    """Train one run or a cross-validation, as ``histoscan train`` does.

    ``histoscan train``: one run, or the cross-validation of ``cfg.folds`` folds (``settings``: how the folds
    predict their out-of-fold patches). Returns the run's or the CV's result (both have ``summary_lines()``).

    A device given without folds is an error: one run trains on ``accelerator`` / ``devices`` and predicts nothing.
    """
    from histoscan.training.fit import train

    if not cfg.folds and settings is not None and settings.device is not None:
        raise ConfigError(
            "--device is where 'train --folds K' predicts its out-of-fold patches; "
            "training runs on --accelerator and --devices"
        )
    return train_folds(cfg, printer=printer, settings=settings) if cfg.folds else train(cfg, printer=printer)


def read_split_raw(path: Path, store: PatchStore) -> np.ndarray:
    """The fold values of a folds file in the store's row order."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    by_id = dict(zip(frame["id"], frame["fold"]))
    return np.array([by_id.get(i, "") for i in store.ids], dtype=object)


def _same_or_new(store: PatchStore, assignment: np.ndarray, name: str, save: Callable[..., Path]) -> Path:
    """The store's saved folds file of this recipe, written only when absent or different."""
    path = store.path / "splits" / f"{name}.csv"
    if path.is_file() and np.array_equal(read_split_raw(path, store), assignment):
        return path
    return save(store, assignment, name, column="fold")


def collect_folds(
    cv_dir: str | Path,
    k: int | None = None,
    *,
    ensemble: bool = True,
    printer: Callable[[str], None] = print,
    settings: PredictorSettings | None = None,
) -> dict[str, Any]:
    """Write ``oof.csv`` and ``cv.json`` from finished fold folders (and the folds' ensemble); nothing is retrained.

    ``settings``: how each fold predicts its validation patches (default: the torch backend on the CPU). The
    out-of-fold predictions use ``settings.tta`` when given, else the folds' default TTA for fitting
    (``inference.tta.default_views``), as their evaluation does; cv.json records which (``tta``) and on which device.
    """
    from histoscan.inference.settings import PredictorSettings
    from histoscan.inference.tta import tta_views
    from histoscan.metrics import auroc

    cv_dir = Path(cv_dir)
    k = k if k is not None else len(list(cv_dir.glob("fold-*")))
    dirs = [fold_dir(cv_dir, i) for i in range(k)]
    for d in dirs:
        if not finished(d):
            raise DataError(f"{d}: fold not trained (or unfinished); train it with --fold {d.name.split('-')[1]}")
    rows, fold_metrics = [], []
    classes: list[str] = []
    tta: list[int] = [0]
    settings = settings or PredictorSettings()
    for i, d in enumerate(dirs):
        run = RunFolder(d)
        predictor = settings.predictor(d, backend="torch")
        classes = predictor.classes
        tta = tta_views(predictor.bundle, settings.tta, "fit")
        part, _ = run.select_patches(run.data_store(), "val")
        pred = predictor.predict_store(part, tta)
        frame = pd.DataFrame({"id": part.ids, "label": [classes[j] for j in part.labels], "fold": i})
        for c, name in enumerate(classes):
            frame[f"prob_{name}"] = pred.probabilities[:, c]
        rows.append(frame)
        fold_metrics.append(_fold_metrics(run))
    oof = pd.concat(rows, ignore_index=True)
    if oof["id"].duplicated().any():
        raise DataError(f"{cv_dir}: patch {oof['id'][oof['id'].duplicated()].iloc[0]!r} is in two validation folds")
    atomic_write_text(cv_dir / OOF_FILE, oof.to_csv(index=False))
    labels = oof["label"].map({c: j for j, c in enumerate(classes)}).to_numpy()
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy()
    summary: dict[str, Any] = {
        "folds": k,
        "tta": len(tta) > 1,
        "device": str(predictor.device),
        "oof": {"auroc": auroc(labels, probs), "patches": len(oof)},
        "metrics": _mean_std(fold_metrics),
        "per_fold": fold_metrics,
    }
    if ensemble:
        from histoscan.inference.ensemble import make_ensemble

        result = make_ensemble(dirs, cv_dir / ENSEMBLE_DIR, oof=cv_dir / OOF_FILE, force=True, printer=printer)
        summary["ensemble"] = {
            "path": ENSEMBLE_DIR,
            "threshold": result.threshold,
            "fitted_on": result.fitted_on,  # calibration rows, or oof: an approximation from single-member scores
        }
    atomic_write_text(cv_dir / CV_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _fold_metrics(run: RunFolder) -> dict[str, float]:
    """One fold's best validation metrics, from its metrics.csv row of the best epoch."""
    doc = run.read_model_json()
    rows = run.read_metrics()
    best = doc.best_metric.get("epoch")
    row = next((r for r in rows if str(r.get("epoch")) == str(best)), rows[-1] if rows else {})
    out = {"best_val_auroc": float(doc.best_metric.get("value") or math.nan)}
    for key in ("val_loss", "val_acc", "val_f1", "val_auroc"):
        if row.get(key) not in (None, ""):
            out[key] = float(row[key])
    out["epochs"] = float(doc.training.get("epochs", 0))
    out["seconds"] = float(doc.training.get("seconds", 0.0))
    return out


def _mean_std(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for m in per_fold for k in m})
    out = {}
    for key in keys:
        values = np.array([m[key] for m in per_fold if key in m], dtype=np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out
