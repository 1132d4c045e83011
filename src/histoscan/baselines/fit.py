"""``histoscan baselines``: fit logistic regression and random forests on the CNNs' split, report them as runs.

Each baseline becomes a run folder (``config.yaml``, ``baseline.json``, ``metrics.csv``, ``split.csv``
and ``eval/`` with the same ``metrics.json`` and report as a CNN run), so ``histoscan compare``
ranks baselines and CNNs in one table.
"""

from __future__ import annotations

import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histoscan import __version__
from histoscan.baselines.features import FEATURES, extract
from histoscan.data.splits import SPLIT_NAMES as SPLITS
from histoscan.data.splits import split_store
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.evaluation.report import write_evaluation
from histoscan.metrics import compute_metrics
from histoscan.runfolder import RunFolder


def _logreg(seed: int) -> ClassifierMixin:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000, random_state=seed))


def _forest(seed: int) -> ClassifierMixin:
    return RandomForestClassifier(n_estimators=300, min_samples_leaf=2, n_jobs=-1, random_state=seed)


MODELS: dict[str, Callable[[int], ClassifierMixin]] = {"logreg": _logreg, "rf": _forest}


@dataclass
class BaselineResult:
    """One fitted baseline: its run folder and validation / test scores."""

    name: str
    run_dir: Path
    val_auroc: float
    test_metrics: dict[str, Any]


def _size(model: ClassifierMixin) -> tuple[int, int]:
    """(parameters, serialised bytes): coefficients for a linear model, tree nodes for a forest."""
    est = model.steps[-1][1] if hasattr(model, "steps") else model
    if hasattr(est, "coef_"):
        params = int(est.coef_.size + est.intercept_.size)
    else:
        params = int(sum(t.tree_.node_count for t in est.estimators_))
    return params, len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def _proba(model: ClassifierMixin, x: np.ndarray, num_classes: int) -> np.ndarray:
    """N x C probabilities in class-index order (columns of classes absent from training stay 0)."""
    out = np.zeros((len(x), num_classes), np.float64)
    out[:, model.classes_] = model.predict_proba(x)
    return out


def run_baselines(
    data: str | Path,
    out: str | Path,
    *,
    models: Sequence[str] = ("logreg", "rf"),
    features: Sequence[str] = ("pixels", "colour"),
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    split_file: str | Path | None = None,
    pixel_size: int = 32,
    n_boot: int = 1000,
    force: bool = False,
    printer: Callable[[str], None] = print,
) -> list[BaselineResult]:
    """Fit every ``model`` on every ``features`` set on the train split; score val and test; write run folders.

    The split is the one CNN runs with the same ``seed``/``val``/``test`` use (saved next to the store),
    or ``split_file``.
    """
    for m in models:
        if m not in MODELS:
            raise ConfigError(f"baseline model {m!r} is not one of {list(MODELS)}")
    for f in features:
        if f not in FEATURES:
            raise ConfigError(f"feature set {f!r} is not one of {list(FEATURES)}")
    store = PatchStore(data)
    if not store.labelled:
        raise DataError(f"{data}: the store has no labels; baselines need a labelled store")
    parts, split_path = split_store(store, val=val, test=test, seed=seed, split_file=split_file)
    for s in SPLITS:
        if len(parts[s]) == 0:
            raise DataError(f"{data}: the {s} split is empty (val={val}, test={test})")
    out = Path(out)
    names = [f"{m}-{f}" for f in features for m in models]
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise ConfigError(f"{out}: baseline runs {clash} exist; pass --force to replace them")
    results = []
    for kind in features:
        t0 = time.perf_counter()
        x = {s: extract(parts[s], kind, pixel_size) for s in SPLITS}
        per_image = (time.perf_counter() - t0) / sum(len(parts[s]) for s in SPLITS)
        printer(f"{kind} features: {x['train'].shape[1]} per patch, {per_image * 1e3:.2f} ms per patch")
        for m in models:
            name = f"{m}-{kind}"
            results.append(
                _fit_one(
                    name,
                    m,
                    kind,
                    store,
                    parts,
                    x,
                    per_image,
                    out / name,
                    split_path,
                    dict(
                        data=str(store.path.resolve()),
                        val=val,
                        test=test,
                        seed=seed,
                        pixel_size=pixel_size,
                        split_file=str(split_file) if split_file else None,
                    ),
                    n_boot,
                    printer,
                )
            )
    return results


def _fit_one(
    name: str,
    model_name: str,
    kind: str,
    store: PatchStore,
    parts: dict[str, PatchStore],
    x: dict[str, np.ndarray],
    per_image: float,
    run_dir: Path,
    split_path: Path,
    settings: dict[str, Any],
    n_boot: int,
    printer: Callable[[str], None],
) -> BaselineResult:
    k, classes = store.num_classes, store.class_names
    y = {s: parts[s].labels for s in SPLITS}
    model = MODELS[model_name](settings["seed"])
    t0 = time.perf_counter()
    model.fit(x["train"], y["train"])
    fit_seconds = time.perf_counter() - t0 + per_image * len(parts["train"])
    probs = {s: _proba(model, x[s], k) for s in ("train", "val")}
    t1 = time.perf_counter()
    probs["test"] = _proba(model, x["test"], k)
    infer_rate = len(parts["test"]) / (time.perf_counter() - t1 + per_image * len(parts["test"]))
    scores = {s: compute_metrics(y[s], probs[s], classes, n_boot=0) for s in ("train", "val")}
    test_metrics = compute_metrics(y["test"], probs["test"], classes, n_boot=n_boot, seed=settings["seed"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run = RunFolder(run_dir)
    params, nbytes = _size(model)
    run.config_path.write_text(yaml.safe_dump({"baseline": model_name, "features": kind, **settings}, sort_keys=False))
    shutil.copy(split_path, run.split_path)
    card = {
        "format": "histoscan-baseline",
        "model": name,
        "estimator": repr(model),
        "features": kind,
        "feature_count": int(x["train"].shape[1]),
        "classes": classes,
        "parameters": params,
        "model_bytes": nbytes,
        "seconds": round(fit_seconds, 2),
        "split": {s: len(parts[s]) for s in SPLITS},
        "val": {"auroc": scores["val"]["auroc"], "accuracy": scores["val"]["accuracy"], "f1": scores["val"]["f1"]},
        "histoscan_version": __version__,
    }
    run.write_baseline(card)
    run.append_metrics(_metrics_row(scores, len(parts["train"]) / max(fit_seconds, 1e-9), fit_seconds))
    info = {
        "run": name,
        "model": name,
        "store": str(store.path.resolve()),
        "split": "test",
        "tta": False,
        "backend": "scikit-learn",
        "inference_images_per_s": round(infer_rate, 1),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "histoscan_version": __version__,
    }
    write_evaluation(
        run.eval_dir(),
        y["test"],
        probs["test"],
        classes,
        test_metrics,
        title=f"Evaluation of {name} (test split)",
        info=info,
        images=parts["test"].batch,
        image_size=store.image_size,
    )
    printer(
        f"{name:16s} val AUROC {scores['val']['auroc']:.4f} acc {scores['val']['accuracy']:.4f} | "
        f"test AUROC {test_metrics['auroc']:.4f} acc {test_metrics['accuracy']:.4f}  ({fit_seconds:.1f} s)"
    )
    return BaselineResult(name, run_dir, scores["val"]["auroc"], test_metrics)


def _metrics_row(scores: dict[str, dict[str, Any]], rate: float, seconds: float) -> dict[str, Any]:
    """One row in the CNN runs' ``metrics.csv`` format (a baseline has one 'epoch')."""
    return {
        "epoch": 0,
        "train_loss": scores["train"]["log_loss"],
        "train_auroc": scores["train"]["auroc"],
        "train_acc": scores["train"]["accuracy"],
        "val_loss": scores["val"]["log_loss"],
        "val_auroc": scores["val"]["auroc"],
        "val_acc": scores["val"]["accuracy"],
        "val_f1": scores["val"]["f1"],
        "lr": "",
        "images_per_s": round(rate, 1),
        "epoch_time_s": round(seconds, 2),
        "best_val_auroc": scores["val"]["auroc"],
    }
