"""Evaluation figures, one PNG per function.

Evaluation figures: confusion matrix, ROC and PR curves, reliability diagram, probability histograms,
learning curves and a grid of the most confident mistakes. Each function writes one PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.layout_engine import ConstrainedLayoutEngine
from sklearn import metrics as skm

from histoscan.geometry import centre_window
from histoscan.reports.figures import image_grid, new_figure, save_png

SQUARE = (560, 520)


def confusion_matrix_png(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Counts, with the row-normalised share (recall per true class) under each."""
    m = np.asarray(cm, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = new_figure(SQUARE)
    a = ax[0, 0]
    a.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            a.text(
                j,
                i,
                f"{int(m[i, j])}\n{share[i, j]:.1%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if share[i, j] > 0.6 else "black",
            )
    a.set_xticks(range(len(classes)), classes, rotation=30)
    a.set_yticks(range(len(classes)), classes)
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title("confusion matrix")
    return save_png(fig, path)


def _one_vs_rest(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, binary truth, score) per curve: the positive class for binary tasks, every class otherwise."""
    if probabilities.shape[1] == 2:
        return [(classes[1], labels == 1, probabilities[:, 1])]
    return [(c, labels == i, probabilities[:, i]) for i, c in enumerate(classes)]


def roc_png(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    path: Path,
    marks: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """ROC curve(s), AUROC in the legend; ``marks`` puts named (fpr, tpr) operating points on it."""
    fig, ax = new_figure(SQUARE)
    a = ax[0, 0]
    for name, truth, score in _one_vs_rest(labels, probabilities, classes):
        fpr, tpr, _ = skm.roc_curve(truth, score)
        a.plot(fpr, tpr, label=f"{name} (AUROC {skm.auc(fpr, tpr):.3f})")
    for name, (x, y) in (marks or {}).items():
        a.plot([x], [y], "o", label=name)
    a.plot([0, 1], [0, 1], ":", color="grey")
    a.set(
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        title="ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    a.legend(loc="lower right", fontsize=8)
    return save_png(fig, path)


def pr_png(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Precision-recall curve(s) with average precision and the prevalence baseline."""
    fig, ax = new_figure(SQUARE)
    a = ax[0, 0]
    for name, truth, score in _one_vs_rest(labels, probabilities, classes):
        prec, rec, _ = skm.precision_recall_curve(truth, score)
        (line,) = a.plot(rec, prec, label=f"{name} (AP {skm.average_precision_score(truth, score):.3f})")
        a.axhline(truth.mean(), ls=":", color=line.get_color(), lw=0.8)
    a.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    a.legend(loc="lower left", fontsize=8)
    return save_png(fig, path)


def reliability_png(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path, bins: int = 15
) -> Path:
    """Observed frequency against mean predicted probability per bin (P(positive), or top-label confidence)."""
    if probabilities.shape[1] == 2:
        conf, hit, what = probabilities[:, 1], (labels == 1).astype(float), f"P({classes[1]})"
    else:
        pred = probabilities.argmax(axis=1)
        conf, hit, what = probabilities.max(axis=1), (pred == labels).astype(float), "top-label confidence"
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = which == b
        if m.any():
            xs.append(conf[m].mean())
            ys.append(hit[m].mean())
            ns.append(int(m.sum()))
    fig, ax = new_figure((560, 620), 2, 1)
    a, h = ax[0, 0], ax[1, 0]
    a.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    a.plot(xs, ys, "o-", label="model")
    a.set(
        xlabel=f"mean predicted {what}",
        ylabel="observed frequency",
        title="reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    a.legend(loc="upper left", fontsize=8)
    h.hist(conf, bins=edges, color="grey")
    h.set(xlabel=what, ylabel="patches", xlim=(0, 1))
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(h_pad=0.1)
    return save_png(fig, path)


def probability_histogram_png(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path, threshold: float | None = None
) -> Path:
    """Histogram of P(positive) per true class (binary), or of P(true class) per class (multi-class)."""
    fig, ax = new_figure((640, 420))
    a = ax[0, 0]
    edges = np.linspace(0, 1, 41)
    binary = probabilities.shape[1] == 2
    for i, c in enumerate(classes):
        m = labels == i
        values = probabilities[m, 1] if binary else probabilities[m, i]
        a.hist(values, bins=edges, alpha=0.55, density=True, label=f"true {c} ({int(m.sum())})")
    if binary and threshold is not None:
        a.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    a.set(
        xlabel=f"P({classes[1]})" if binary else "P(true class)",
        ylabel="density",
        title="predicted probabilities per class",
    )
    a.legend(fontsize=8)
    return save_png(fig, path)


def learning_curves_png(metrics: pd.DataFrame, path: Path) -> Path | None:
    """Loss, AUROC and accuracy per epoch from a run's ``metrics.csv`` (None when it has no epochs)."""
    if metrics.empty or "epoch" not in metrics:
        return None
    fig, ax = new_figure((960, 340), 1, 3)
    for a, (what, cols) in zip(
        ax[0],
        [
            ("loss", ("train_loss", "val_loss")),
            ("AUROC", ("train_auroc", "val_auroc")),
            ("accuracy", ("train_acc", "val_acc")),
        ],
    ):
        for col in cols:
            if col in metrics and metrics[col].notna().any():
                a.plot(metrics["epoch"], metrics[col], "o-", ms=3, label=col.split("_")[0])
        a.set(xlabel="epoch", title=what)
        a.legend(fontsize=8)
    return save_png(fig, path)


def mistakes_png(
    images: np.ndarray, titles: list[str], path: Path, title: str, outline: tuple[int, int] | None
) -> Path:
    """A grid of mistaken patches (most confident first)."""
    return image_grid(images, titles, path, cols=8, suptitle=title, outline=outline)


def confident_mistakes(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], threshold: float, per_kind: int = 8
) -> dict[str, list[tuple[int, str]]]:
    """Positions of the most confident errors with a caption each.

    Binary: false positives (highest P(positive) among negatives) and false negatives (lowest among
    positives); multi-class: the errors with the highest predicted probability.
    """
    out: dict[str, list[tuple[int, str]]] = {}
    if probabilities.shape[1] == 2:
        p = probabilities[:, 1]
        fp = np.flatnonzero((labels == 0) & (p >= threshold))
        fn = np.flatnonzero((labels == 1) & (p < threshold))
        out["false positives"] = [(int(i), f"P={p[i]:.3f}") for i in fp[np.argsort(-p[fp])][:per_kind]]
        out["false negatives"] = [(int(i), f"P={p[i]:.3f}") for i in fn[np.argsort(p[fn])][:per_kind]]
    else:
        pred = probabilities.argmax(axis=1)
        wrong = np.flatnonzero(pred != labels)
        conf = probabilities[wrong, pred[wrong]]
        out["confident errors"] = [
            (int(i), f"{classes[labels[i]]}->{classes[pred[i]]} {probabilities[i, pred[i]]:.2f}")
            for i in wrong[np.argsort(-conf)][: per_kind * 2]
        ]
    return out


def centre_outline(image_size: Sequence[int], region: int = 32) -> tuple[int, int] | None:
    """The labelled centre box of HCD/PCam-style 96 px patches (None for other sizes)."""
    h, w = int(image_size[0]), int(image_size[1])
    if h == w == 96:
        return (centre_window(h, w, region)[0], region)
    return None


def figure_captions() -> dict[str, str]:
    """What each evaluation figure shows (used by the HTML report)."""
    return {
        "confusion_matrix": "Confusion matrix at the stored decision threshold (counts and share of each true class).",
        "roc": "ROC curve(s); dots mark operating points.",
        "pr": "Precision-recall curve(s); dotted lines show prevalence.",
        "reliability": "Reliability diagram: a calibrated model follows the diagonal.",
        "probabilities": "Predicted probabilities by true class.",
        "learning_curves": "Learning curves from metrics.csv.",
        "risk_coverage": "Risk-coverage: error rate of the answered images as the least sure are referred.",
    }
