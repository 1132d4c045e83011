"""Synthetic slides for tests, the demo and benchmarks: pyramidal tiled TIFFs OpenSlide opens.

Levels are written as top-level reduced-resolution pages (OpenSlide ignores SubIFDs), tiled and
with resolution tags in centimetres, so OpenSlide reports ``openslide.mpp-x``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histoscan.data.synthetic import _write_kaggle_part, synth_patch
from histoscan.geometry import centre_slices

TileFn = Callable[[float, int, int, int, int], np.ndarray]  # (downsample, y, x, h, w) -> uint8 RGB of that level


def _tiles(fn: TileFn, downsample: float, height: int, width: int, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            t = fn(downsample, y, x, min(tile, height - y), min(tile, width - x))
            if t.shape[:2] != (tile, tile):  # edge tiles are padded to the full tile size
                full = np.full((tile, tile, 3), 255, np.uint8)
                full[: t.shape[0], : t.shape[1]] = t
                t = full
            yield t


def write_tiled_pyramid(
    path: str | Path,
    size: tuple[int, int],
    fn: TileFn,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    compression: str = "zlib",
    resolution_tag: tuple[float, str] | None = None,
    description: str | None = None,
) -> Path:
    """A pyramidal tiled TIFF of ``size`` = (height, width) whose tiles come from ``fn``, level by level.

    ``resolution_tag`` = (value, "INCH" or "CENTIMETER") writes that level-0 tag instead of ``mpp``'s (to
    build files that lie, e.g. (72, "INCH")); ``description`` is the first page's ImageDescription (an
    Aperio-style one makes OpenSlide read it as SVS, objective power included).
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h0, w0 = size
    with tifffile.TiffWriter(path, bigtiff=h0 * w0 * 3 > 2**31) as tw:
        for k, d in enumerate(downsamples):
            h, w = max(1, h0 // d), max(1, w0 // d)
            res: dict[str, Any] = {}
            if resolution_tag is not None:
                value = resolution_tag[0] / d
                res = {"resolution": (value, value), "resolutionunit": resolution_tag[1]}
            elif mpp is not None:
                ppcm = 1e4 / (mpp * d)
                res = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            if description is not None:
                res.update(description=description if k == 0 else "", metadata=None)
            tw.write(
                _tiles(fn, float(d), h, w, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if k == 0 else 1,
                **res,
            )
    return path


def write_slide(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 2, 4),
    tile: int = 128,
    compression: str = "zlib",
    resolution_tag: tuple[float, str] | None = None,
    description: str | None = None,
) -> Path:
    """A small in-memory level-0 image as a pyramidal slide (levels shrunk with a box filter)."""
    h, w = image.shape[:2]
    levels = {1: image}
    for d in downsamples:
        if d != 1:
            levels[d] = np.asarray(
                Image.fromarray(image).resize((max(1, w // d), max(1, h // d)), Image.Resampling.BOX)
            )

    def fn(d: float, y: int, x: int, th: int, tw_: int) -> np.ndarray:
        return levels[int(d)][y : y + th, x : x + tw_]

    return write_tiled_pyramid(path, (h, w), fn, mpp, downsamples, tile, compression, resolution_tag, description)


def crop_pool(n: int, seed: int, cell: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normal and ``n`` tumour labelled centres (cell x cell crops of synthetic 96 px patches, easy classes)."""
    rng = np.random.default_rng(seed)
    rows, cols = centre_slices(96, 96, cell)
    normal = np.stack([synth_patch(rng, 0, 96, 0.0)[rows, cols] for _ in range(n)])
    tumour = np.stack([synth_patch(rng, 1, 96, 0.0)[rows, cols] for _ in range(n)])
    return normal, tumour


def mosaic(labels: np.ndarray, pool: tuple[np.ndarray, np.ndarray], seed: int) -> np.ndarray:
    """An image of cells: cell (r, c) is a random labelled centre of class ``labels[r, c]`` (random flips)."""
    rng = np.random.default_rng(seed)
    cell = pool[0].shape[1]
    rows, cols = labels.shape
    out = np.empty((rows * cell, cols * cell, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            crops = pool[int(labels[r, c])]
            crop = crops[rng.integers(len(crops))]
            k = int(rng.integers(8))
            crop = np.rot90(crop[:, ::-1] if k >= 4 else crop, k % 4)
            out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = crop
    return out


def write_mosaic_patches(out: str | Path, n: int, seed: int = 0, cell: int = 32) -> Path:
    """Kaggle-layout training patches of 3 x 3 cells whose label is the centre cell's class.

    Neighbours are random, so a model trained on them looks at the labelled centre, as a PCam model does.
    """
    rng = np.random.default_rng(seed)
    pool = crop_pool(max(40, n // 4), seed + 1, cell)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    images = np.empty((n, 3 * cell, 3 * cell, 3), np.uint8)
    for i, lbl in enumerate(labels):
        grid = (rng.random((3, 3)) < 0.5).astype(np.int64)
        grid[1, 1] = lbl
        images[i] = mosaic(grid, pool, int(rng.integers(2**31)))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{seed:04d}{i:08d}" for i in range(n)]
    _write_kaggle_part(root, "train", "train_labels.csv", ids, images, labels.tolist())
    return root


def tumour_slide(
    path: str | Path,
    rows: int,
    cols: int,
    region: tuple[int, int, int, int],
    mpp: float,
    upsample: int = 1,
    margin: int = 2,
    seed: int = 0,
    hole: tuple[int, int, int, int] | None = None,
) -> tuple[Path, np.ndarray]:
    """A slide of ``rows`` x ``cols`` tissue cells inside a white margin, tumour in ``region`` (r0, r1, c0, c1).

    ``hole`` (r0, r1, c0, c1) is a normal area inside the region. Level 0 is the mosaic enlarged
    ``upsample`` times (pixel repetition) at ``mpp``; the levels are 1, 2, 4 (times ``upsample``).
    Returns the path and the true tumour mask over the tissue cells.
    """
    truth = np.zeros((rows, cols), bool)
    r0, r1, c0, c1 = region
    truth[r0:r1, c0:c1] = True
    if hole is not None:
        truth[hole[0] : hole[1], hole[2] : hole[3]] = False
    pool = crop_pool(60, seed + 5)
    tissue = mosaic(truth.astype(np.int64), pool, seed + 6)
    cell = pool[0].shape[1]
    img = np.full(((rows + 2 * margin) * cell, (cols + 2 * margin) * cell, 3), 245, np.uint8)
    img[margin * cell : (margin + rows) * cell, margin * cell : (margin + cols) * cell] = tissue
    if upsample > 1:
        img = img.repeat(upsample, axis=0).repeat(upsample, axis=1)
    downs = sorted({1, upsample, 2 * upsample, 4 * upsample})
    return write_slide(path, img, mpp, downs), truth


def sparse_tissue_slide(
    path: str | Path,
    side: int = 100_000,
    mpp: float = 0.25,
    tissue: float = 0.10,
    seed: int = 0,
    downsamples: Sequence[int] = (1, 4, 16, 64),
    compression: str = "jpeg",
) -> Path:
    """A large square slide with about ``tissue`` of its area covered by a few tissue blobs, the rest glass.

    Made tile by tile (never held whole): glass tiles are one repeated array, tissue tiles a repeated
    synthetic texture, so a 100,000 px slide takes a few minutes and compresses to little.
    """
    tile = 256
    n = -(-side // tile)
    rng = np.random.default_rng(seed)
    blobs = np.zeros((n, n), bool)
    yy, xx = np.ogrid[0:n, 0:n]
    while blobs.mean() < tissue:
        cy, cx = rng.uniform(0.15, 0.85, 2) * n
        ry, rx = rng.uniform(0.04, 0.1, 2) * n
        blobs |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    labels = (rng.random((16, 16)) < 0.3).astype(np.int64)
    texture = mosaic(labels, crop_pool(20, seed + 1), seed + 2)  # 512 x 512
    glass = np.full((tile, tile, 3), 243, np.uint8)

    def fn(d: float, y: int, x: int, th: int, tw: int) -> np.ndarray:
        rows = np.minimum(((y + np.arange(th)) * int(d)) // tile, n - 1)
        cols = np.minimum(((x + np.arange(tw)) * int(d)) // tile, n - 1)
        m = blobs[np.ix_(rows, cols)]
        if not m.any():
            return glass[:th, :tw]
        tex = texture[np.ix_((y + np.arange(th)) % 512, (x + np.arange(tw)) % 512)]
        return np.where(m[..., None], tex, glass[:th, :tw])

    return write_tiled_pyramid(path, (side, side), fn, mpp, downsamples, tile, compression)
