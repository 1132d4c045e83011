"""Write an evaluation folder: ``metrics.json``, the figures and one self-contained ``report.html``.

Used for CNN runs (through the Predictor) and for classical baselines alike, so both are
reported, and read back by the leaderboard, in the same format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoscan.evaluation import plots
from histoscan.reports.html import HtmlReport
from histoscan.runfolder import FIGURES_DIR, METRICS_JSON, REPORT_HTML

ImageLoader = Callable[[np.ndarray], np.ndarray]


def write_evaluation(
    out: str | Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    metrics: dict[str, Any],
    *,
    title: str,
    info: dict[str, Any],
    images: ImageLoader | None = None,
    image_size: Sequence[int] = (96, 96),
    metrics_csv: str | Path | None = None,
) -> Path:
    """Write ``out/metrics.json`` (``metrics`` plus ``info``), ``out/figures/*.png`` and ``out/report.html``.

    Args:
        out: the evaluation folder.
        labels: true class index per image (N).
        probabilities: class probabilities per image (N x C).
        classes: the class names, in the model's order.
        metrics: the computed metrics (``evaluation.metrics``), written as they are.
        title: the report's title.
        info: what was evaluated (run, store, split, TTA...), added to metrics.json and shown in the report.
        image_size: the images' height and width, for the grid of mistakes.
        images: loads uint8 images by position (for the grid of confident mistakes), or None.
        metrics_csv: a run's per-epoch ``metrics.csv`` for the learning curves, or None.
    """
    out = Path(out)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    threshold = float(metrics.get("threshold", 0.5))
    figures: dict[str, Path] = {
        "confusion_matrix": plots.confusion_matrix_png(
            metrics["confusion_matrix"], classes, fig_dir / "confusion_matrix.png"
        ),
        "roc": plots.roc_png(labels, probabilities, classes, fig_dir / "roc.png", _operating_points(metrics)),
        "pr": plots.pr_png(labels, probabilities, classes, fig_dir / "pr.png"),
        "reliability": plots.reliability_png(labels, probabilities, classes, fig_dir / "reliability.png"),
        "probabilities": plots.probability_histogram_png(
            labels, probabilities, classes, fig_dir / "probabilities.png", threshold if len(classes) == 2 else None
        ),
    }
    if "trust" in metrics:
        from histoscan.trust.scoring import risk_coverage_png

        figures["risk_coverage"] = risk_coverage_png(metrics["trust"], fig_dir / "risk_coverage.png")
    if metrics_csv is not None and Path(metrics_csv).is_file():
        curves = plots.learning_curves_png(pd.read_csv(metrics_csv), fig_dir / "learning_curves.png")
        if curves is not None:
            figures["learning_curves"] = curves
    if images is not None:
        for kind, items in plots.confident_mistakes(labels, probabilities, classes, threshold).items():
            if items:
                name = kind.replace(" ", "_")
                figures[name] = plots.mistakes_png(
                    images(np.array([i for i, _ in items])),
                    [t for _, t in items],
                    fig_dir / f"{name}.png",
                    f"most confident {kind}",
                    plots.centre_outline(image_size),
                )
    record = {**info, "metrics": metrics, "figures": {k: str(v.relative_to(out)) for k, v in figures.items()}}
    (out / METRICS_JSON).write_text(json.dumps(record, indent=2))
    _html(out / REPORT_HTML, title, info, metrics, figures)
    return out


def _operating_points(metrics: dict[str, Any]) -> dict[str, tuple[float, float]]:
    if metrics.get("task") != "binary":
        return {}
    points = {
        f"threshold {metrics['threshold']:.3f}": (1 - metrics["specificity"], metrics["sensitivity"]),
        f"Youden {metrics['youden']['threshold']:.3f}": (
            1 - metrics["youden"]["specificity"],
            metrics["youden"]["sensitivity"],
        ),
    }
    return points


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a reader wants first."""
    lo, hi = metrics["auroc_ci95"]
    head: dict[str, Any] = {
        "patches": metrics["count"],
        "AUROC": metrics["auroc"],
        "AUROC 95% CI": f"[{lo:.4f}, {hi:.4f}]",
        "average precision": metrics["average_precision"],
        "accuracy": metrics["accuracy"],
        "balanced accuracy": metrics["balanced_accuracy"],
        "F1": metrics["f1"],
        "Brier score": metrics["brier"],
        "ECE": metrics["ece"],
        "log loss": metrics["log_loss"],
    }
    if metrics["task"] == "binary":
        head.update(
            {
                "threshold": metrics["threshold"],
                "sensitivity": metrics["sensitivity"],
                "specificity": metrics["specificity"],
            }
        )
    else:
        head["AUROC (weighted)"] = metrics["auroc_weighted"]
    return head


def _html(path: Path, title: str, info: dict[str, Any], metrics: dict[str, Any], figures: dict[str, Path]) -> Path:
    rep = HtmlReport(
        title, subtitle=", ".join(f"{k}: {v}" for k, v in info.items() if isinstance(v, (str, int, float)))
    )
    rep.heading("Summary")
    rep.key_values(headline(metrics))
    rep.heading("Per class")
    cr = metrics["classification_report"]
    rows = [
        [c, cr[c]["precision"], cr[c]["recall"], cr[c]["f1-score"], int(cr[c]["support"])] for c in metrics["classes"]
    ]
    if metrics["task"] == "multiclass":
        rows = [[*r, metrics["auroc_per_class"][r[0]]] for r in rows]
    rep.table(
        ["class", "precision", "recall", "F1", "support"]
        + (["AUROC (one-vs-rest)"] if metrics["task"] == "multiclass" else []),
        rows,
    )
    if metrics["task"] == "binary":
        rep.heading("Thresholds")
        y = metrics["youden"]
        t_rows = [
            ["stored", metrics["threshold"], metrics["sensitivity"], metrics["specificity"]],
            ["Youden's J", y["threshold"], y["sensitivity"], y["specificity"]],
        ]
        t_rows += [
            [f"sensitivity >= {t['target_sensitivity']:g}", t["threshold"], t["sensitivity"], t["specificity"]]
            for t in metrics["target_sensitivity"]
        ]
        rep.table(["threshold", "value", "sensitivity", "specificity"], t_rows)
        if info.get("split") == "test":
            rep.paragraph(
                "Thresholds chosen on the test split are for reading only; save one chosen on the "
                "validation split with 'histoscan evaluate --save-threshold'.",
                note=True,
            )
    if "stain_shift" in metrics:
        from histoscan.stain.shift import add_shift_section

        add_shift_section(rep, metrics["stain_shift"])
    if "trust" in metrics:
        from histoscan.trust.scoring import add_trust_section

        add_trust_section(rep, metrics["trust"])
    rep.heading("Figures")
    captions = plots.figure_captions()
    for name, png in figures.items():
        rep.figure(png, captions.get(name, name.replace("_", " ")))
    return rep.write(path)
