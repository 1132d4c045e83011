"""The five per-slide outputs: heatmap PNG, probability grid (TIFF + JSON), tiles.csv, QuPath GeoJSON, summary.

Everything is written into a scratch folder that :func:`publish` renames into place in one step, so a
killed scan never leaves a complete-looking slide folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histoscan.wsi.grid import SlideGrid
from histoscan.wsi.tissue import TissueMask

HEATMAP_FILE = "heatmap.png"
PROB_FILE = "probabilities.tif"
PROB_META_FILE = "probabilities.json"
TILES_FILE = "tiles.csv"
REGIONS_FILE = "regions.geojson"
SUMMARY_FILE = "summary.json"
TUMOUR_COLOUR = [200, 0, 0]
HEATMAP_SIDE = 1600  # thumbnail pixels drawn under the heatmap (the figure is about 900 px wide)


def cell_edges(grid: SlideGrid) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x edges (cols + 1) and y edges (rows + 1) of the heatmap cells."""
    c = grid.cell_px
    xs = grid.bounds.x + np.arange(grid.cols + 1) * c
    ys = grid.bounds.y + np.arange(grid.rows + 1) * c
    return xs, ys


def write_probabilities(folder: Path, grid: SlideGrid, probs: np.ndarray) -> None:
    """float32 grid of P(tumour) (NaN = not scanned) as a TIFF, with its geometry in a JSON beside it."""
    import tifffile

    tifffile.imwrite(folder / PROB_FILE, probs.astype(np.float32), compression="zlib")
    meta = {
        "file": PROB_FILE,
        "rows": grid.rows,
        "cols": grid.cols,
        "origin_level0_px": [grid.bounds.x, grid.bounds.y],
        "cell_level0_px": grid.cell_px,
        "cell_um": grid.cell_um,
        "slide_mpp": grid.slide_mpp,
        "nodata": "NaN (cell not scanned: too little tissue)",
        "cell_to_level0": "x = origin_x + col * cell_level0_px, y = origin_y + row * cell_level0_px (top-left)",
        "qupath_offset_px": [grid.bounds.x, grid.bounds.y],
    }
    (folder / PROB_META_FILE).write_text(json.dumps(meta, indent=2))


def tiles_frame(
    grid: SlideGrid, rows: np.ndarray, cols: np.ndarray, tissue: np.ndarray, probs: np.ndarray, unc: np.ndarray | None
) -> pd.DataFrame:
    """One row per scanned cell: the labelled cell and the context tile in level-0 px, tissue, probability."""
    lab = grid.label_boxes(rows, cols)
    til = grid.tile_boxes(rows, cols)
    frame = pd.DataFrame(
        {
            "row": rows,
            "col": cols,
            "x": lab[:, 0].round(2),
            "y": lab[:, 1].round(2),
            "width": lab[:, 2].round(2),
            "height": lab[:, 3].round(2),
            "tile_x": til[:, 0].round(2),
            "tile_y": til[:, 1].round(2),
            "tile_width": til[:, 2].round(2),
            "tile_height": til[:, 3].round(2),
            "tissue": tissue.round(4),
            "probability": probs.astype(np.float64).round(6),
        }
    )
    if unc is not None:
        frame["uncertainty"] = unc.astype(np.float64).round(6)
    return frame


def regions_geojson(
    grid: SlideGrid,
    probs: np.ndarray,
    threshold: float,
    class_name: str,
    tiles: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Tumour regions above ``threshold`` as QuPath annotations (holes kept), plus optional tile objects.

    Coordinates are level-0 pixels minus the slide's bounds origin, which is where QuPath puts them.
    """
    from scipy import ndimage
    from shapely import box, union_all
    from shapely.geometry import mapping

    b = grid.bounds
    xs, ys = cell_edges(grid)
    xs, ys = xs - b.x, ys - b.y
    frame = box(0, 0, b.width, b.height)
    above = np.nan_to_num(probs, nan=0.0) >= threshold
    labels, _ = ndimage.label(above)  # 4-connected: each component's cells union to one polygon
    mpp2 = grid.slide_mpp**2
    features = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        rr, cc = np.nonzero(labels[where] == k)
        rr, cc = rr + where[0].start, cc + where[1].start
        geom = union_all([box(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r, c in zip(rr, cc, strict=True)])
        geom = geom.intersection(frame)
        if geom.is_empty:
            continue
        p = probs[rr, cc]
        for poly in getattr(geom, "geoms", [geom]):
            if poly.geom_type != "Polygon" or poly.area <= 0:
                continue
            features.append(
                _feature(
                    mapping(poly),
                    "annotation",
                    class_name,
                    {
                        "area_um2": round(float(poly.area) * mpp2, 3),
                        "mean_probability": round(float(np.mean(p)), 6),
                        "max_probability": round(float(np.max(p)), 6),
                    },
                )
            )
    if tiles is not None:
        cells = tiles[["x", "y", "width", "height", "probability"]].to_numpy(np.float64)
        for x, y, w, h, p_tile in cells:
            geom = mapping(box(x - b.x, y - b.y, x - b.x + w, y - b.y + h))
            features.append(_feature(geom, "tile", None, {"probability": float(p_tile)}))
    return {"type": "FeatureCollection", "features": features}


def _feature(geometry: Any, kind: str, class_name: str | None, measurements: dict[str, float]) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": kind, "measurements": measurements}
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": TUMOUR_COLOUR}
    geometry = json.loads(json.dumps(geometry))  # tuples -> lists
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def write_heatmap(folder: Path, grid: SlideGrid, probs: np.ndarray, thumb: np.ndarray, tissue: TissueMask) -> None:
    """The probability map over the slide thumbnail, with a colour bar and the tissue outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w0 = tissue.mask.shape[1] * tissue.scale_x
    h0 = tissue.mask.shape[0] * tissue.scale_y
    thumb, mask = _shrink(thumb, HEATMAP_SIDE), _shrink(tissue.mask.astype(np.uint8) * 255, HEATMAP_SIDE) > 127
    mx, my = w0 / mask.shape[1], h0 / mask.shape[0]
    xs, ys = cell_edges(grid)
    aspect = h0 / w0
    fig, ax = plt.subplots(figsize=(8, max(2.5, min(16, 8 * aspect))), dpi=110)
    ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation="bilinear")
    overlay = np.ma.masked_invalid(probs)
    im = ax.imshow(
        overlay,
        extent=(xs[0], xs[-1], ys[-1], ys[0]),
        cmap="inferno",
        vmin=0.0,
        vmax=1.0,
        alpha=0.55,
        interpolation="nearest",
    )
    if mask.any() and not mask.all():
        mh, mw = mask.shape
        gx, gy = (np.arange(mw) + 0.5) * mx, (np.arange(mh) + 0.5) * my
        ax.contour(gx, gy, mask.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.6)
    ax.set_xlim(0, w0)
    ax.set_ylim(h0, 0)
    ax.set_xlabel("level-0 x (px)")
    ax.set_ylabel("level-0 y (px)")
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="P(tumour)")
    fig.tight_layout()
    fig.savefig(folder / HEATMAP_FILE)
    plt.close(fig)


def _shrink(img: np.ndarray, side: int) -> np.ndarray:
    """An image shrunk so its longer side is at most ``side`` (the figure shows no more)."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    f = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX))


def write_json(path: Path, data: Any) -> None:
    """JSON, indented."""
    path.write_text(json.dumps(data, indent=2))


def scratch_folder(out: Path, name: str) -> Path:
    """A fresh scratch folder for one slide's outputs (a stale one from a killed scan is removed)."""
    tmp = out / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Move a finished scratch folder into place in one rename (replacing an older result)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
