"""``histoscan slide --explain-top K``: Grad-CAM overlays of a slide's K most suspicious tiles."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histoscan.explain.explainer import Explainer
from histoscan.explain.render import Geometry, panel, png_bytes

EXPLAIN_DIR = "explain"


def explain_top_tiles(
    run_dir: str | Path,
    read_tile: Callable[[int, int], np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    probs: np.ndarray,
    boxes: np.ndarray,
    k: int,
    folder: Path,
    device: str = "cpu",
    stain_sample: np.ndarray | None = None,
) -> Path:
    """Write ``folder/explain/``: one PNG (tile, map, overlay) per top-``k`` tile, one colour scale, and tiles.csv.

    Args:
        run_dir: the run folder of the model to explain.
        read_tile: reads the context tile of cell (row, col) at the model's size (uint8 HxWx3).
        rows: the scanned cells' grid rows.
        cols: the scanned cells' grid columns.
        probs: the cells' probabilities.
        boxes: the cells' level-0 tile boxes (x, y, w, h).
        k: how many of the most probable tiles to explain.
        folder: the slide's output folder; the overlays go to its ``explain/`` sub-folder.
        device: torch device of the explainer.
        stain_sample: per-group stain models: the slide's stain sample (``wsi.scan.slide_stain``), so the
            tiles are explained under the slide's one estimate, as they were scanned.
    """
    out = folder / EXPLAIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    top = np.argsort(-probs, kind="stable")[:k]
    explainer = Explainer(run_dir, device=device, batch_size=max(1, min(k, 32)))
    tiles = np.stack([read_tile(int(rows[i]), int(cols[i])) for i in top])
    groups = None
    if stain_sample is not None:
        groups = np.full(len(tiles), "slide")
        explainer.pre.estimate_stain_groups(np.full(len(stain_sample), "slide"), lambda p: stain_sample[p])
    ex = explainer.explain_batch(tiles, groups=groups)
    vmax = max(float(np.stack(ex.maps).max()), 1e-12)
    pre = explainer.pre
    geometry = Geometry.from_preprocessing(pre.image_size, pre.label_size, pre.crop)
    with (out / "tiles.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "row", "col", "tile_x", "tile_y", "tile_width", "tile_height", "probability", "png"])
        for rank, (i, m, tile) in enumerate(zip(top, ex.maps, tiles), start=1):
            r, c = int(rows[i]), int(cols[i])
            name = f"{rank:03d}_r{r}_c{c}.png"
            x, y, bw, bh = (round(float(v), 2) for v in boxes[i])
            caption = [f"rank {rank}: row {r}, col {c} (level-0 x {x}, y {y})", f"P = {float(probs[i]):.3f}"]
            (out / name).write_bytes(png_bytes(panel(tile, m, vmax, caption, geometry)))
            w.writerow([rank, r, c, x, y, bw, bh, f"{float(probs[i]):.6f}", name])
    return out
