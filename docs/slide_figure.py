"""The README's picture: a real slide's tumour heatmap with its regions, drawn from ``histoscan slide``'s outputs.

Scans SLIDE with RUN (``histoscan slide``, its defaults) into a temporary folder, then draws the slide's
thumbnail, the probability grid (``probabilities.tif`` + ``probabilities.json``), the tumour
regions from ``regions.geojson`` (in QuPath's coordinates: level-0 px minus the slide's bounds origin) and
a colour bar, and writes a small PNG. RUN should be a model trained on real tissue (for example the
cpu-default trained by ``benchmarks/quality_hcd.py --out DIR``); a model trained on synthetic patches draws
a meaningless map.

Run: python docs/slide_figure.py RUN [--slide ../shared/data/wsi/CMU-1-Small-Region.svs]
     [--out docs/images/slide-heatmap.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def scan(run: Path, slide: Path, out: Path) -> Path:
    """Scan ``slide`` with ``run`` into ``out``; return the slide's output folder."""
    cmd = [sys.executable, "-m", "histoscan", "slide", str(run), str(slide), "--out", str(out)]
    subprocess.run(cmd, check=True)
    folders = [p for p in out.iterdir() if (p / "summary.json").is_file()]
    if len(folders) != 1:
        sys.exit(f"{out}: expected one scanned slide, found {len(folders)}")
    return folders[0]


def draw(slide: Path, folder: Path, png: Path, width_px: int = 900) -> Path:
    """Thumbnail, probability grid and regions of one scanned slide, as a PNG of about ``width_px`` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import openslide

    probs = tifffile.imread(folder / "probabilities.tif")
    grid = json.loads((folder / "probabilities.json").read_text())
    (ox, oy), cell = grid["origin_level0_px"], float(grid["cell_level0_px"])
    with openslide.OpenSlide(str(slide)) as s:
        w0, h0 = s.dimensions
        thumb = np.asarray(s.get_thumbnail((1600, 1600)).convert("RGB"))
    rows, cols = probs.shape
    fig, ax = plt.subplots(figsize=(width_px / 110, width_px / 110 * h0 / w0), dpi=110)
    ax.imshow(thumb, extent=(0, w0, h0, 0))
    im = ax.imshow(
        np.ma.masked_invalid(probs),
        extent=(ox, ox + cols * cell, oy + rows * cell, oy),
        cmap="inferno",
        vmin=0,
        vmax=1,
        alpha=0.5,
        interpolation="nearest",
    )
    regions = json.loads((folder / "regions.geojson").read_text())
    for feature in regions.get("features", []):
        geom = feature["geometry"]
        polygons = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        for polygon in polygons:
            for ring in polygon:
                xy = np.asarray(ring, dtype=float) + np.array([ox, oy])  # QuPath coordinates back to level 0
                ax.plot(xy[:, 0], xy[:, 1], color="cyan", linewidth=1.2)
    ax.set_xlim(0, w0)
    ax.set_ylim(h0, 0)  # cells of the last row and column may reach past the slide's edge
    ax.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="P(tumour)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder trained on real tissue")
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "slide-heatmap.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="histoscan-slide-figure-") as tmp:
        print(draw(args.slide, scan(args.run, args.slide, Path(tmp)), args.out))


if __name__ == "__main__":
    main()
