"""The probability grid of a scanned slide as a coloured PNG, and where it lies on the slide.

The grid (float32 P(tumour), NaN where a cell was not scanned) is read from probabilities.tif:
a plain TIFF today, a pyramidal OME-TIFF in later versions (tifffile reads the full-resolution
level of either). Its placement comes from probabilities.json, or from summary.json when that
file is absent or lacks a key.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscan.serving.slides.library import SlideEntry

COLORMAP = "inferno"  # the same colours as heatmap.png (wsi/outputs.py)
MAX_OVERLAY_SIDE = 2048  # the PNG is enlarged by a whole factor up to this side, so each cell stays a crisp square


@dataclass(frozen=True)
class Placement:
    """The grid's top-left corner and cell size in level-0 pixels, its shape, and the cell side in um."""

    x: float
    y: float
    cell_px: float
    rows: int
    cols: int
    cell_um: float | None

    def to_dict(self, offset: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
        """The placement, with the grid's corner also in Deep Zoom image pixels (level-0 minus ``offset``)."""
        return {
            "origin_level0_px": [self.x, self.y],
            "cell_level0_px": self.cell_px,
            "cell_um": self.cell_um,
            "rows": self.rows,
            "cols": self.cols,
            "x": self.x - offset[0],
            "y": self.y - offset[1],
            "width": self.cols * self.cell_px,
            "height": self.rows * self.cell_px,
        }


def placement(entry: SlideEntry, meta: dict[str, Any] | None, shape: tuple[int, int] | None) -> Placement | None:
    """Where the grid lies, from probabilities.json (``meta``) or the summary; None when neither says."""
    meta = meta or {}
    s = entry.summary
    origin = meta.get("origin_level0_px")
    bounds: dict[str, Any] = s["bounds"] if isinstance(s.get("bounds"), dict) else {}
    if not (isinstance(origin, list) and len(origin) == 2):
        origin = [bounds.get("x", 0), bounds.get("y", 0)]
    cell_um = _num(meta.get("cell_um")) or entry.number("cell_um")
    mpp = _num(meta.get("slide_mpp")) or entry.number("slide_mpp")
    cell_px = _num(meta.get("cell_level0_px")) or (cell_um / mpp if cell_um and mpp else None)
    grid = s.get("grid") if isinstance(s.get("grid"), list) else None
    rows = meta.get("rows") or (shape[0] if shape else None) or (grid[0] if grid else None)
    cols = meta.get("cols") or (shape[1] if shape else None) or (grid[1] if grid else None)
    if not cell_px or not rows or not cols:
        return None
    return Placement(float(origin[0]), float(origin[1]), float(cell_px), int(rows), int(cols), cell_um)


def read_grid(path: Path) -> np.ndarray:
    """The full-resolution probability grid (rows x cols float32) of a plain or pyramidal TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        grid = tif.series[0].levels[0].asarray()
    grid = np.asarray(grid, np.float32)
    while grid.ndim > 2:  # an OME-TIFF may carry singleton channel / z / time axes
        grid = grid[0] if grid.shape[0] == 1 else grid[..., 0]
    return grid


def colour_stops(n: int = 11) -> list[str]:
    """``n`` colours of the map from P = 0 to P = 1 as #rrggbb, for the page's colour bar."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    return ["#{:02x}{:02x}{:02x}".format(*(round(255 * float(c)) for c in cmap(i / (n - 1))[:3])) for i in range(n)]


def overlay_png(grid: np.ndarray) -> bytes:
    """The grid coloured with the map (P 0 to 1), cells not scanned transparent, each cell a square of pixels."""
    from matplotlib import colormaps
    from PIL import Image

    cmap = colormaps[COLORMAP]
    valid = np.isfinite(grid)
    rgba = (cmap(np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0)) * 255).round().astype(np.uint8)
    rgba[..., 3] = np.where(valid, 255, 0)
    k = max(1, min(16, MAX_OVERLAY_SIDE // max(1, *grid.shape)))
    if k > 1:
        rgba = np.repeat(np.repeat(rgba, k, axis=0), k, axis=1)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
