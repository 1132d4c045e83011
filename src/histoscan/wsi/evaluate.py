"""Slide-level and lesion-level evaluation of a scan folder (its slides.csv and per-slide outputs).

Slide level: AUROC of each slide score with a 95% bootstrap interval, and sensitivity/specificity of
calling a slide tumour when its highest cell probability reaches the run's threshold (the one that drew
its regions). Lesion level, with tumour annotations: Camelyon16's FROC, sensitivity at 1/4, 1/2, 1, 2,
4 and 8 false positives per slide, and their mean (the challenge's score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoscan.errors import DataError
from histoscan.metrics import auroc, bootstrap_statistic
from histoscan.wsi.annotations import annotation_for, read_annotations

SCORES = ("max_probability", "topk_mean_probability")
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class SlideEvaluationSettings:
    """How a scan folder is evaluated."""

    # a folder of <slide>.geojson / <slide>.xml, or such files (their stems name the slides): lesion-level FROC
    annotations: str | Path | tuple[str | Path, ...] | None = None
    bootstrap: int = 1000  # resamples for the AUROC interval (0: none)
    seed: int = 0
    threshold: float | None = None  # slide call threshold (default: the run's, from slides.csv)
    detection_floor: float = 0.5  # a detection is a connected group of cells at or above this probability
    tolerance_um: float = 75.0  # a detection this close to a lesion hits it (Camelyon16: 75 um)
    fp_rates: tuple[float, ...] = FP_RATES


@dataclass
class SlideEvaluation:
    """Slide-level scores and, with annotations, the lesion-level FROC."""

    auroc: dict[str, float]
    slides: int
    positives: int
    table: pd.DataFrame
    auroc_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    froc: dict[float, float] | None = None  # FP per slide -> lesion sensitivity
    froc_score: float | None = None
    lesions: int = 0
    detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return {
            "slides": self.slides,
            "positives": self.positives,
            "auroc": self.auroc,
            "auroc_ci95": {k: list(v) for k, v in self.auroc_ci.items()},
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "froc": None if self.froc is None else {str(k): v for k, v in self.froc.items()},
            "froc_score": self.froc_score,
            "lesions": self.lesions,
            "detections": self.detections,
        }

    def lines(self) -> list[str]:
        """What the command prints."""
        out = []
        for s, v in self.auroc.items():
            line = f"slide-level AUROC ({s}, {self.slides} slides, {self.positives} tumour): {v:.4f}"
            if s in self.auroc_ci:  # no interval without bootstrap resamples (bootstrap=0)
                lo, hi = self.auroc_ci[s]
                line += f" (95% CI {lo:.4f}-{hi:.4f})"
            out.append(line)
        if self.threshold is not None and self.sensitivity is not None:
            out.append(
                f"at the run's threshold {self.threshold:.4g} (max probability): sensitivity {self.sensitivity:.4f}, "
                f"specificity {self.specificity:.4f}"
            )
        if self.froc is not None:
            pts = ", ".join(f"{k:g} FP: {v:.3f}" for k, v in self.froc.items())
            out.append(
                f"lesion FROC ({self.lesions} lesions, {self.detections} detections): {pts}; score {self.froc_score:.4f}"
            )
        return out


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


def _rank_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary AUROC as the Mann-Whitney statistic (ties count half); NaN without both classes.

    The bootstrap asks for it a thousand times: ranks are ~50x faster than sklearn's curve per call.
    """
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _resampled_auroc(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> float:
    return _rank_auroc(y[idx], p[idx])


def detections(folder: Path, floor: float) -> list[tuple[float, float, float]]:
    """(score, x, y) per connected group of cells at or above ``floor``: its highest cell, in level-0 px."""
    import tifffile
    from scipy import ndimage

    meta_path, grid_path = folder / "probabilities.json", folder / "probabilities.tif"
    if not meta_path.is_file() or not grid_path.is_file():
        raise DataError(f"{folder}: no probabilities.tif/probabilities.json (not a finished scan folder)")
    meta = json.loads(meta_path.read_text())
    probs = np.asarray(tifffile.imread(grid_path), np.float32)
    ox, oy = meta["origin_level0_px"]
    cell = float(meta["cell_level0_px"])
    p = np.nan_to_num(probs, nan=0.0)
    labels, _ = ndimage.label(p >= floor)
    out = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        sub = np.where(labels[where] == k, p[where], -1.0)
        r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)
        r, c = r + where[0].start, c + where[1].start
        out.append((float(p[r, c]), ox + (c + 0.5) * cell, oy + (r + 0.5) * cell))
    return out


def froc(
    hits: list[tuple[float, list[tuple[int, int]] | None]], n_lesions: int, n_slides: int, rates: tuple[float, ...]
) -> dict[float, float]:
    """Sensitivity at each FP-per-slide rate from scored detections (lesions hit, or None for a false positive).

    The operating points are every score threshold; at each rate the best sensitivity whose average false
    positives per slide do not exceed it is taken (a step FROC, no interpolation).
    """
    order = sorted(hits, key=lambda h: -h[0])
    found: set[tuple[int, int]] = set()
    fps = 0
    points = [(0.0, 0.0)]  # (FP per slide, sensitivity)
    i = 0
    while i < len(order):
        score = order[i][0]
        while i < len(order) and order[i][0] == score:  # ties enter together
            lesions = order[i][1]
            if lesions is None:
                fps += 1
            else:
                found.update(lesions)
            i += 1
        points.append((fps / n_slides, len(found) / n_lesions if n_lesions else float("nan")))
    return {r: max(s for f, s in points if f <= r) for r in rates}


def _annotation_finder(spec: str | Path | tuple[str | Path, ...] | None, slides: set[str]) -> tuple[Any, str | None]:
    """The annotation file of each scanned slide, from a folder or a list of files.

    (slide -> its annotation file or None, a name for messages) from a folder or a list of files; (None, None)
    without annotations. A file that does not exist, or whose name is no scanned slide, is refused.
    """
    if spec is None or (isinstance(spec, tuple) and not spec):
        return None, None
    if not isinstance(spec, tuple):
        folder = Path(spec)
        if not folder.is_dir():
            raise DataError(f"{folder}: annotation folder not found")
        return partial(annotation_for, folder), str(folder)
    files: dict[str, Path] = {}
    for f in map(Path, spec):
        if f.is_dir():
            raise DataError(f"{f}: give one annotation folder, or annotation files, not both")
        if not f.is_file():
            raise DataError(f"{f}: annotation file not found")
        if f.suffix.lower() not in (".geojson", ".json", ".xml"):
            raise DataError(f"{f}: an annotation file is QuPath GeoJSON (.geojson, .json) or ASAP XML (.xml)")
        if f.stem not in slides:
            raise DataError(
                f"{f}: names no scanned slide (the file's name is the slide's, e.g. {sorted(slides)[0]}.xml)"
            )
        if f.stem in files:
            raise DataError(f"{f}: slide {f.stem} already has annotations ({files[f.stem]})")
        files[f.stem] = f
    return files.get, f"the annotation files ({len(files)})"


def evaluate_slides(
    slides_csv: str | Path, labels_csv: str | Path | None = None, settings: SlideEvaluationSettings | None = None
) -> SlideEvaluation:
    """Evaluate a scan folder's slides.csv: slide-level AUROC (95% CI), sensitivity/specificity, lesion FROC.

    ``slides_csv``: a scan's slides.csv, or the scan's output folder holding it. Slide labels come
    from ``labels_csv`` (slide,label), else from the annotations (a slide whose file
    holds a lesion is tumour; a slide without a file is normal). The lesion FROC needs
    ``settings.annotations`` (a folder, or a tuple of files named after their slides); each slide's outputs are read from the folder beside slides.csv.
    """
    settings = settings or SlideEvaluationSettings()
    slides_csv = Path(slides_csv)
    if slides_csv.is_dir():  # the scan's output folder holding it
        slides_csv = slides_csv / "slides.csv"
    scores = _read(slides_csv, ("slide", *SCORES))
    done = scores[scores["status"] == "done"] if "status" in scores else scores
    if done.empty:
        raise DataError(f"{slides_csv}: no finished slide to evaluate")
    find, ann_dir = _annotation_finder(settings.annotations, set(done["slide"]))
    annotations: dict[str, Any] = {}
    if find is not None:
        for _, row in done.iterrows():
            meta = slides_csv.parent / row["slide"] / "probabilities.json"
            origin = tuple(json.loads(meta.read_text())["origin_level0_px"]) if meta.is_file() else (0.0, 0.0)
            f = find(row["slide"])
            annotations[row["slide"]] = read_annotations(f, (origin[0], origin[1])) if f is not None else None
    if labels_csv is not None:
        labels = _read(Path(labels_csv), ("slide", "label"))
        labels = labels.assign(slide=labels["slide"].map(lambda s: Path(str(s)).stem))
        table = done.merge(labels[["slide", "label"]], on="slide", how="inner")
        unlabelled = sorted(set(done["slide"]) - set(table["slide"]))
        if unlabelled:
            raise DataError(f"{labels_csv}: no label for slide(s) {unlabelled[:5]}")
        y = _label_values(table["label"], Path(labels_csv))
        if ann_dir is not None:
            lacking = [s for s, v in zip(table["slide"], y, strict=True) if v == 1 and not annotations.get(s)]
            if lacking:
                raise DataError(f"{ann_dir}: tumour slide(s) {lacking[:5]} have no annotation file for the FROC")
    elif ann_dir is not None:
        table = done.copy()
        y = np.array([int(bool(annotations[s] and annotations[s].lesions)) for s in table["slide"]], np.int64)
    else:
        raise DataError(f"{slides_csv}: give slide labels (a slide,label CSV) or a folder of tumour annotations")
    table = table.assign(label=y).reset_index(drop=True)
    if len(np.unique(y)) < 2:
        raise DataError(f"{labels_csv or ann_dir}: slide-level AUROC needs both tumour and normal slides")
    result: dict[str, float] = {}
    ci: dict[str, tuple[float, float]] = {}
    for s in SCORES:
        p = table[s].to_numpy(np.float64)
        two = np.stack([1 - p, p], axis=1)
        result[s] = auroc(y, two)
        if settings.bootstrap > 0:  # 0: no interval (not a NaN one)
            ci[s] = bootstrap_statistic(partial(_resampled_auroc, y, p), len(y), settings.bootstrap, settings.seed)
    ev = SlideEvaluation(result, len(table), int(y.sum()), table, ci)
    threshold = settings.threshold
    if threshold is None and "threshold" in table and table["threshold"].notna().all():
        values = table["threshold"].unique()
        if len(values) > 1:
            raise DataError(f"{slides_csv}: slides were scanned at different thresholds {sorted(values)[:5]}")
        threshold = float(values[0])
    if threshold is not None:
        called = table["max_probability"].to_numpy(np.float64) >= threshold
        ev.threshold = threshold
        ev.sensitivity = float(called[y == 1].mean())
        ev.specificity = float((~called[y == 0]).mean())
    if ann_dir is not None:
        _lesion_froc(ev, slides_csv.parent, annotations, settings, ann_dir)
    return ev


def _lesion_froc(
    ev: SlideEvaluation, root: Path, annotations: dict[str, Any], settings: SlideEvaluationSettings, source: str
) -> None:
    """Fill in the FROC: detections inside an exclusion region (and hitting no lesion) are not counted."""
    from shapely import Point, prepared

    hits: list[tuple[float, list[tuple[int, int]] | None]] = []
    n_lesions = 0
    for i, slide in enumerate(ev.table["slide"]):
        ann = annotations.get(slide)
        mpp = float(ev.table["slide_mpp"].iloc[i]) if "slide_mpp" in ev.table else float("nan")
        if not np.isfinite(mpp):
            meta = json.loads((root / slide / "probabilities.json").read_text())
            mpp = float(meta["slide_mpp"])
        tol = settings.tolerance_um / mpp
        lesions = [prepared.prep(g.buffer(tol)) for g in (ann.lesions if ann else [])]
        exclusion = ann.exclusion if ann else None
        n_lesions += len(lesions)
        for score, x, y in detections(root / slide, settings.detection_floor):
            pt = Point(x, y)
            hit = [(i, j) for j, g in enumerate(lesions) if g.contains(pt)]
            if hit:
                hits.append((score, hit))
            elif exclusion is None or exclusion.is_empty or not exclusion.contains(pt):
                hits.append((score, None))
    ev.lesions, ev.detections = n_lesions, len(hits)
    if n_lesions == 0:
        raise DataError(f"{source}: no tumour lesion in the annotations of the scanned slides")
    ev.froc = froc(hits, n_lesions, len(ev.table), settings.fp_rates)
    ev.froc_score = float(np.mean(list(ev.froc.values())))
