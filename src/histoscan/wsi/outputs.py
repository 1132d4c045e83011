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
TUMOUR_CLASS = "Tumor"  # QuPath's built-in class, so regions take its colour and count with its annotations
TUMOUR_COLOUR = [200, 0, 0]  # QuPath's colour for Tumor, as its GeoJSON export writes it
PYRAMID_MIN_SIDE = 64  # probabilities.tif: halve until the longer side is at most this
HEATMAP_SIDE = 1000  # thumbnail pixels drawn under the heatmap (the figure is 880 px wide: about 1:1)


def cell_edges(grid: SlideGrid) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x edges (cols + 1) and y edges (rows + 1) of the heatmap cells."""
    c = grid.cell_px
    xs = grid.bounds.x + np.arange(grid.cols + 1) * c
    ys = grid.bounds.y + np.arange(grid.rows + 1) * c
    return xs, ys


def _halve(a: np.ndarray) -> np.ndarray:
    """The next pyramid level: the mean of each 2 x 2 block's scanned cells (NaN where none was scanned)."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), np.nan, np.float32)
    p[:h, :w] = a
    blocks = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2)
    count = np.sum(~np.isnan(blocks), axis=(1, 3))
    total = np.nansum(blocks, axis=(1, 3))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def probability_pyramid(probs: np.ndarray) -> list[np.ndarray]:
    """Level 0 and its halvings, down to a longer side of ``PYRAMID_MIN_SIDE`` (at least one halving)."""
    levels = [probs.astype(np.float32)]
    while min(levels[-1].shape) >= 2 and (len(levels) == 1 or max(levels[-1].shape) > PYRAMID_MIN_SIDE):
        levels.append(_halve(levels[-1]))
    return levels


def write_probabilities(folder: Path, grid: SlideGrid, probs: np.ndarray) -> None:
    """float32 grid of P(tumour) (NaN = not scanned) as a pyramidal OME-TIFF, with its geometry in a JSON beside it.

    The OME-XML states the cell size (PhysicalSizeX/Y, um) and where the grid's top-left corner lies on
    the slide (Plane PositionX/Y, um from level-0 pixel (0, 0)); levels are SubIFDs, as OME-TIFF pyramids are.
    """
    import tifffile

    levels = probability_pyramid(probs)
    x_um, y_um = grid.bounds.x * grid.slide_mpp, grid.bounds.y * grid.slide_mpp
    metadata = {
        "axes": "YX",
        "Name": "P(tumour) per heatmap cell",
        "PhysicalSizeX": grid.cell_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": grid.cell_um,
        "PhysicalSizeYUnit": "µm",
        "Plane": {"PositionX": [x_um], "PositionXUnit": ["µm"], "PositionY": [y_um], "PositionYUnit": ["µm"]},
    }
    opts: dict[str, Any] = {"tile": (256, 256), "compression": "zlib"}
    with tifffile.TiffWriter(folder / PROB_FILE, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **opts)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **opts)
    meta = {
        "file": PROB_FILE,
        "rows": grid.rows,
        "cols": grid.cols,
        "origin_level0_px": [grid.bounds.x, grid.bounds.y],
        "cell_level0_px": grid.cell_px,
        "cell_um": grid.cell_um,
        "slide_mpp": grid.slide_mpp,
        "origin_um": [x_um, y_um],
        "pyramid_levels": [list(level.shape) for level in levels],
        "nodata": "NaN (cell not scanned: too little tissue)",
        "cell_to_level0": "x = origin_x + col * cell_level0_px, y = origin_y + row * cell_level0_px (top-left)",
        "qupath_offset_px": [grid.bounds.x, grid.bounds.y],
    }
    (folder / PROB_META_FILE).write_text(json.dumps(meta, indent=2))


def tiles_frame(
    grid: SlideGrid,
    rows: np.ndarray,
    cols: np.ndarray,
    tissue: np.ndarray,
    probs: np.ndarray,
    unc: np.ndarray | None,
    answers: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per scanned cell: the labelled cell and the context tile in level-0 px, tissue, probability.

    With ``answers``: each cell's answer (its class, ``refer``, ``not tissue`` or ``out of distribution``).
    """
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
    if answers is not None:
        frame["answer"] = answers
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
    Each region is the union of its cells simplified within half a cell (staircases become their
    diagonals), made valid, and oriented as RFC 7946 asks: exterior rings counter-clockwise and holes
    clockwise in the written coordinates (shapely's ``orient`` on those values; drawn with y pointing
    down, as image viewers do, they look the other way round). Its class is QuPath's ``Tumor``; the
    measurements (area of its cells, mean and max probability) are those of its cells.
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
        for cells in getattr(geom, "geoms", [geom]):
            if cells.geom_type != "Polygon" or cells.area <= 0:
                continue
            region = _simplified(cells, grid.cell_px / 2.0)
            feature = _feature(
                mapping(region),
                "annotation",
                TUMOUR_CLASS,
                {
                    "area_um2": round(float(cells.area) * mpp2, 3),
                    "mean_probability": round(float(np.mean(p)), 6),
                    "max_probability": round(float(np.max(p)), 6),
                },
            )
            feature["properties"]["name"] = f"{class_name} (P >= {threshold:.3g})"
            features.append(feature)
    if tiles is not None:
        cells = tiles[["x", "y", "width", "height", "probability"]].to_numpy(np.float64)
        for x, y, w, h, p_tile in cells:
            geom = mapping(box(x - b.x, y - b.y, x - b.x + w, y - b.y + h))
            features.append(_feature(geom, "tile", None, {"probability": float(p_tile)}))
    return {"type": "FeatureCollection", "features": features}


def _simplified(cells: Any, tolerance: float) -> Any:
    """A region's cell union simplified within ``tolerance``, valid, exterior CCW and holes CW as written.

    Douglas-Peucker with topology preserved keeps rings from crossing; should the result still be
    invalid, ``make_valid`` repairs it (a MultiPolygon then); a ring collapsed by simplification keeps the cells.
    """
    from shapely import MultiPolygon, make_valid
    from shapely.geometry.polygon import orient

    geom = cells.simplify(tolerance, preserve_topology=True)
    if geom.is_empty or geom.area <= 0:
        geom = cells
    if not geom.is_valid:
        geom = make_valid(geom)
        polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and g.area > 0]
        geom = cells if not polys else polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if geom.geom_type == "Polygon":
        return orient(geom, sign=1.0)
    return MultiPolygon([orient(g, sign=1.0) for g in geom.geoms])


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
    ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation="antialiased")  # already shrunk to about 1:1
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
    fig.savefig(folder / HEATMAP_FILE, pil_kwargs={"compress_level": 1})  # fast zlib: 1/4 of the encode time
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
