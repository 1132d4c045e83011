"""Slide-level evaluation: slides.csv scores against a ``slide,label`` CSV (AUROC)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoscan.errors import DataError
from histoscan.metrics import auroc

SCORES = ("max_probability", "topk_mean_probability")


@dataclass
class SlideEvaluation:
    """Slide-level AUROC per score, and the joined table."""

    auroc: dict[str, float]
    slides: int
    positives: int
    table: pd.DataFrame

    def lines(self) -> list[str]:
        """One line per slide score, as ``histoscan slide evaluate`` prints them."""
        return [
            f"slide-level AUROC ({score}, {self.slides} slides, {self.positives} tumour): {value:.4f}"
            for score, value in self.auroc.items()
        ]


def _read(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={"slide": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    return frame


def _label_values(labels: pd.Series, path: Path) -> np.ndarray:
    """0/1 labels; also accepts class words such as normal/tumour."""
    words = {"0": 0, "1": 1, "normal": 0, "negative": 0, "tumor": 1, "tumour": 1, "positive": 1}
    mapped = labels.astype(str).str.strip().str.lower().map(words)
    if mapped.isna().any():
        bad = labels[mapped.isna()].iloc[0]
        raise DataError(f"{path}: label {bad!r} is not 0/1 (or normal/tumour)")
    return mapped.to_numpy(np.int64)


def evaluate_slides(slides_csv: str | Path, labels_csv: str | Path) -> SlideEvaluation:
    """AUROC of each slide score (max, top-k mean) on the scanned slides that have a label.

    ``slides_csv``: a scan's slides.csv, or the scan's output folder holding it.
    """
    slides_csv = Path(slides_csv)
    if slides_csv.is_dir():
        slides_csv = slides_csv / "slides.csv"
    scores = _read(slides_csv, ("slide", *SCORES))
    labels = _read(Path(labels_csv), ("slide", "label"))
    labels = labels.assign(slide=labels["slide"].map(lambda s: Path(str(s)).stem))
    done = scores[scores.get("status", "done") == "done"] if "status" in scores else scores
    table = done.merge(labels[["slide", "label"]], on="slide", how="inner")
    unlabelled = sorted(set(done["slide"]) - set(table["slide"]))
    if unlabelled:
        raise DataError(f"{labels_csv}: no label for slide(s) {unlabelled[:5]}")
    if table.empty:
        raise DataError(f"{slides_csv}: no scanned slide has a label in {labels_csv}")
    y = _label_values(table["label"], Path(labels_csv))
    if len(np.unique(y)) < 2:
        raise DataError(f"{labels_csv}: slide-level AUROC needs both tumour and normal slides")
    table = table.assign(label=y)
    result = {}
    for s in SCORES:
        p = table[s].to_numpy(np.float64)
        result[s] = auroc(y, np.stack([1 - p, p], axis=1))
    return SlideEvaluation(result, len(table), int(y.sum()), table)
