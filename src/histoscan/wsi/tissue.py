"""Tissue masks at low resolution: detected (saturation + Otsu + morphology) or given (PNG, QuPath GeoJSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from histoscan.errors import DataError
from histoscan.thresholds import DARK_VALUE, MIN_OBJECT_UM2, MIN_SATURATION
from histoscan.wsi.reader import Bounds, SlideReader

MASK_MAX_SIDE = 4096
MASK_SUFFIXES = (".png", ".geojson", ".json")  # what --mask reads: a PNG or a QuPath GeoJSON


@dataclass
class TissueMask:
    """A boolean mask over the whole level-0 image; ``scale`` level-0 px per mask px along x and y."""

    mask: np.ndarray
    scale_x: float
    scale_y: float
    source: str = "detected"
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def fraction(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction inside each level-0 (x, y, w, h) box, from an integral image (area-weighted)."""
        h, w = self.mask.shape
        if self._integral is None or self._integral.shape != (h + 1, w + 1):  # built once, asked band by band
            self._integral = np.zeros((h + 1, w + 1), np.int32)  # exact counts, half the memory of float64
            self._integral[1:, 1:] = self.mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
        integral = self._integral

        def corner(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            # bilinear lookup of the integral image makes the sum area-exact at fractional mask pixels
            xs, ys = np.clip(xs, 0, w), np.clip(ys, 0, h)
            x0, y0 = np.minimum(xs.astype(int), w - 1), np.minimum(ys.astype(int), h - 1)
            fx, fy = xs - x0, ys - y0
            i = integral
            return (  # int32 entries promote to float64 against the float weights
                i[y0, x0] * (1 - fx) * (1 - fy)
                + i[y0, x0 + 1] * fx * (1 - fy)
                + i[y0 + 1, x0] * (1 - fx) * fy
                + i[y0 + 1, x0 + 1] * fx * fy
            )

        x0, y0 = boxes[:, 0] / self.scale_x, boxes[:, 1] / self.scale_y
        x1, y1 = (boxes[:, 0] + boxes[:, 2]) / self.scale_x, (boxes[:, 1] + boxes[:, 3]) / self.scale_y
        total = corner(x1, y1) - corner(x0, y1) - corner(x1, y0) + corner(x0, y0)
        area = (x1 - x0) * (y1 - y0)
        return np.where(area > 0, total / np.maximum(area, 1e-12), 0.0)

    def area_mm2(self, mpp: float) -> float:
        """Tissue area in mm^2 for a level-0 resolution of ``mpp`` um/px."""
        return float(self.mask.sum()) * self.scale_x * self.scale_y * mpp * mpp / 1e6


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (a few lines; scikit-image is not a dependency)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = hist.cumsum()
    w1 = w0[-1] - w0
    m0 = (hist * centres).cumsum()
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def tissue_from_rgb(rgb: np.ndarray, mask_px_um2: float | None = None) -> np.ndarray:
    """Tissue pixels of a low-resolution RGB image.

    Saturation above Otsu's threshold (and above glass level), minus very dark pixels (slide edges,
    black marker) and green/blue pen ink (hues far from eosin and haematoxylin); then holes are
    filled, gaps closed and specks below ``MIN_OBJECT_UM2`` (or 0.05% of the image) removed.
    """
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=2), x.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    thr = max(otsu_threshold(sat), MIN_SATURATION) if sat.max() > MIN_SATURATION else 1.0
    tissue = (sat > thr) & (mx > DARK_VALUE)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    pen = ((g > r) & (g >= b)) | ((b > r + 0.3) & (b > g + 0.2))  # green or pure blue ink: not H&E
    tissue &= ~pen
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3)), iterations=2, border_value=0)
    tissue = ndimage.binary_fill_holes(tissue)
    labels, n = ndimage.label(tissue)
    if n:
        sizes = np.bincount(labels.ravel())
        min_px = MIN_OBJECT_UM2 / mask_px_um2 if mask_px_um2 else tissue.size * 0.0005
        keep = sizes >= max(min_px, 4)
        keep[0] = False
        tissue = keep[labels]
    return tissue


def detect_tissue(
    reader: SlideReader, mpp: float | None, max_side: int = MASK_MAX_SIDE, thumb: np.ndarray | None = None
) -> TissueMask:
    """Detect tissue on a thumbnail of at most ``max_side`` px (or on ``thumb``, a thumbnail already read)."""
    thumb = reader.thumbnail(max_side) if thumb is None else thumb
    w, h = reader.dimensions
    sx, sy = w / thumb.shape[1], h / thumb.shape[0]
    mask = tissue_from_rgb(thumb, sx * sy * mpp * mpp if mpp else None)
    return TissueMask(mask, sx, sy, "detected")


def load_mask(path: str | Path, reader: SlideReader, max_side: int = MASK_MAX_SIDE) -> TissueMask:
    """A user's mask: a PNG of the slide's aspect ratio (non-zero = tissue), or a QuPath GeoJSON region."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: mask file not found")
    if p.suffix.lower() in (".geojson", ".json"):
        return _mask_from_geojson(p, reader, max_side)
    try:
        with Image.open(p) as im:
            mask = np.asarray(im.convert("L")) > 0
    except Exception as exc:  # Pillow raises many types for bad files
        raise DataError(f"{p}: unreadable mask image ({type(exc).__name__})") from exc
    w, h = reader.dimensions
    mh, mw = mask.shape
    if abs((mw / w) / (mh / h) - 1.0) > max(0.01, 1.5 / mw + 1.5 / mh):  # 1%, or the rounding of a small mask
        raise DataError(
            f"{p}: mask is {mw}x{mh} px but the slide {reader.path.name} is {w}x{h}; give a mask with the "
            "slide's aspect ratio (any scale)"
        )
    return TissueMask(mask, w / mw, h / mh, "png")


def _mask_from_geojson(path: Path, reader: SlideReader, max_side: int) -> TissueMask:
    from shapely.geometry import shape

    try:
        data = json.loads(path.read_text())
        if isinstance(data, list):  # QuPath exports a bare list of features
            features = data
        else:
            features = data["features"] if data.get("type") == "FeatureCollection" else [data]
        geoms = [shape(f.get("geometry", f)) for f in features]
    except Exception as exc:  # malformed JSON or geometry
        raise DataError(f"{path}: not a GeoJSON region ({type(exc).__name__}: {exc})") from exc
    w, h = reader.dimensions
    scale = max(1.0, max(w, h) / max_side)
    mw, mh = max(1, round(w / scale)), max(1, round(h / scale))
    sx, sy = w / mw, h / mh
    img = Image.new("L", (mw, mh), 0)
    draw = ImageDraw.Draw(img)
    b: Bounds = reader.bounds  # QuPath coordinates start at the bounds origin
    for g in geoms:
        for poly in getattr(g, "geoms", [g]):
            if poly.geom_type != "Polygon":
                continue
            ext = [((x + b.x) / sx, (y + b.y) / sy) for x, y in poly.exterior.coords]
            draw.polygon(ext, fill=1)
            for ring in poly.interiors:
                draw.polygon([((x + b.x) / sx, (y + b.y) / sy) for x, y in ring.coords], fill=0)
    mask = np.asarray(img) > 0
    if not mask.any():
        raise DataError(f"{path}: the GeoJSON holds no polygon inside the slide {reader.path.name}")
    return TissueMask(mask, sx, sy, "geojson")
