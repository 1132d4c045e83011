"""Metrics from class probabilities, binary and multi-class, with bootstrap confidence intervals.

Everything is computed from ``labels`` (class index per patch) and ``probabilities`` (N x C,
rows summing to 1): the same function scores CNN runs, classical baselines and tuning trials.
Pure functions of labels and scores, so the module sits in the core layer: stain, trust and
evaluation all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from histoscan.errors import ConfigError, DataError

ECE_BINS = 15
THRESHOLD_RULES = ("youden", "sensitivity")


def check_inputs(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> None:
    """Shapes agree, labels are known classes, and at least two classes are present."""
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise DataError(f"expected probabilities of shape (N, {len(classes)}), got {probabilities.shape}")
    if len(labels) != len(probabilities):
        raise DataError(f"{len(labels)} labels for {len(probabilities)} predictions")
    if len(labels) == 0:
        raise DataError("nothing to evaluate: the split is empty")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError("some patches have no label (or an unknown one): evaluation needs a labelled split")
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(
            f"the split holds a single class ({classes[int(present[0])]!r}, {len(labels)} patches): "
            "AUROC and sensitivity/specificity need both positives and negatives"
        )


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width bins: sum over bins of |accuracy - mean confidence| weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(float(correct[m].mean()) - float(confidence[m].mean()))
    return float(total)


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUROC of P(class 1), or macro one-vs-rest AUROC for multi-class."""
    if probabilities.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probabilities[:, 1]))
    return float(
        skm.roc_auc_score(
            labels, probabilities, multi_class="ovr", average="macro", labels=np.arange(probabilities.shape[1])
        )
    )


def bootstrap_interval(
    labels: np.ndarray, probabilities: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (resamples lacking a class are drawn again)."""
    if n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n, k = len(labels), probabilities.shape[1]
    values: list[float] = []
    tries = 0
    while len(values) < n_boot and tries < n_boot * 10:
        tries += 1
        idx = rng.integers(0, n, n)
        if len(np.unique(labels[idx])) < k:
            continue
        values.append(auroc(labels[idx], probabilities[idx]))
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    fpr, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    i = int(np.argmax(tpr - fpr))
    return {
        "threshold": _finite(thr[i]),
        "sensitivity": float(tpr[i]),
        "specificity": float(1 - fpr[i]),
        "j": float(tpr[i] - fpr[i]),
    }


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> dict[str, float]:
    """The highest threshold whose sensitivity reaches ``target`` (so specificity is as high as it can be)."""
    if not 0 < target <= 1:
        raise DataError(f"target sensitivity must be in (0, 1], got {target}")
    fpr, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    i = int(np.flatnonzero(tpr >= target)[0])
    return {
        "target_sensitivity": target,
        "threshold": _finite(thr[i]),
        "sensitivity": float(tpr[i]),
        "specificity": float(1 - fpr[i]),
    }


def pick_threshold(labels: np.ndarray, scores: np.ndarray, rule: str, target: float = 0.95, source: str = "") -> float:
    """The threshold rule every bundle's stored threshold uses: Youden's J, or the highest reaching ``target`` sensitivity."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule {rule!r} is not one of {list(THRESHOLD_RULES)}")
    if len(np.unique(labels)) < 2:
        raise DataError(f"{source}: the validation predictions hold a single class; cannot choose a threshold")
    chosen = youden_threshold(labels, scores) if rule == "youden" else threshold_for_sensitivity(labels, scores, target)
    return float(chosen["threshold"])


def _finite(t: float) -> float:
    """roc_curve's first threshold is +inf (nothing positive); report it as just above 1."""
    return float(min(t, 1.0 + 1e-9)) if np.isfinite(t) else 1.0 + 1e-9


def _clipped(probabilities: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Probabilities kept off 0 and 1 and renormalised (for the log loss)."""
    p = np.clip(probabilities, eps, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def classify(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary: P(class 1) >= threshold; multi-class: argmax."""
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def compute_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    *,
    threshold: float = 0.5,
    target_sensitivities: Sequence[float] = (0.95,),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of the evaluation report, as a JSON-ready dict.

    Binary: AUROC with a bootstrap 95% interval, average precision, accuracy, balanced accuracy,
    the classification report, sensitivity and specificity at ``threshold``, Brier score, ECE,
    confusion matrix, Youden's threshold and the thresholds reaching each target sensitivity.
    Multi-class: macro and weighted one-vs-rest AUROC, per-class AUROC, and the same others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    check_inputs(labels, probabilities, classes)
    k = len(classes)
    pred = classify(probabilities, threshold)
    lo, hi = bootstrap_interval(labels, probabilities, n_boot, seed)
    onehot = np.eye(k)[labels]
    report = skm.classification_report(
        labels, pred, labels=np.arange(k), target_names=list(classes), output_dict=True, zero_division=0
    )
    out: dict[str, Any] = {
        "task": "binary" if k == 2 else "multiclass",
        "classes": list(classes),
        "count": len(labels),
        "counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "auroc": auroc(labels, probabilities),
        "auroc_ci95": [lo, hi],
        "bootstrap_resamples": int(n_boot),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)),
        "brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)) / (2 if k == 2 else 1)),
        "log_loss": float(skm.log_loss(labels, _clipped(probabilities), labels=np.arange(k))),
        "classification_report": report,
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=np.arange(k)).tolist(),
    }
    if k == 2:
        scores = probabilities[:, 1]
        tn, fp, fn, tp = (int(v) for v in np.asarray(out["confusion_matrix"]).ravel())
        out.update(
            {
                "threshold": float(threshold),
                "average_precision": float(skm.average_precision_score(labels, scores)),
                "f1": float(skm.f1_score(labels, pred, zero_division=0)),
                "sensitivity": tp / max(1, tp + fn),
                "specificity": tn / max(1, tn + fp),
                "ece": expected_calibration_error(scores, labels.astype(float)),
                "youden": youden_threshold(labels, scores),
                "target_sensitivity": [threshold_for_sensitivity(labels, scores, t) for t in target_sensitivities],
            }
        )
    else:
        per_class = skm.roc_auc_score(onehot, probabilities, average=None)
        out.update(
            {
                "auroc_weighted": float(
                    skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="weighted")
                ),
                "auroc_per_class": {c: float(v) for c, v in zip(classes, per_class)},
                "average_precision": float(skm.average_precision_score(onehot, probabilities, average="macro")),
                "f1": float(skm.f1_score(labels, pred, average="macro", zero_division=0)),
                "f1_weighted": float(skm.f1_score(labels, pred, average="weighted", zero_division=0)),
                "ece": expected_calibration_error(probabilities.max(axis=1), (pred == labels).astype(float)),
            }
        )
    return out


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` items (NaN draws are dropped)."""
    if n_boot <= 0 or n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(n_boot)]
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return float(lo), float(hi)


# ---- selective classification: answering the surest first ---------------------------------------------------
def selective_risks(doubt: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Error rate of the ``k`` surest answers for ``k`` = 1..n (the least doubt answered first).

    Images of equal doubt cannot be told apart, so within a run of ties the errors count as spread evenly
    (the expectation over the orders of the tie): a score that ties everything gets the full error rate at
    every coverage, never a lucky order.
    """
    d = np.asarray(doubt, dtype=np.float64)
    w = np.asarray(wrong, dtype=bool)
    n = len(d)
    if n == 0:
        raise DataError("no predictions to rank")
    order = np.argsort(d, kind="stable")
    d, w = d[order], w[order]
    cum = np.concatenate([[0.0], np.cumsum(w, dtype=np.float64)])
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    ends = np.r_[starts[1:], n]
    sizes = ends - starts
    group = np.repeat(np.arange(len(starts)), sizes)
    within = np.arange(1, n + 1) - starts[group]
    errors = cum[starts][group] + (cum[ends] - cum[starts])[group] * within / sizes[group]
    return errors / np.arange(1, n + 1)


def aurc(doubt: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean error rate of the ``k`` surest answers over every ``k``."""
    return float(selective_risks(doubt, wrong).mean())


def optimal_aurc(wrong: np.ndarray) -> float:
    """The AURC of a perfect ranking (every error after every correct answer) at the same error count."""
    w = np.asarray(wrong, dtype=bool)
    n, correct = len(w), int((~w).sum())
    k = np.arange(1, n + 1)
    return float((np.maximum(0, k - correct) / k).mean())


def excess_aurc(doubt: np.ndarray, wrong: np.ndarray) -> float:
    """E-AURC: the AURC above a perfect ranking's, so ranking quality is seen apart from accuracy (0: perfect)."""
    return aurc(doubt, wrong) - optimal_aurc(wrong)
