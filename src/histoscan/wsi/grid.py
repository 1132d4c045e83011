"""Slide geometry in one object: tile, labelled centre, stride, resolution and where every cell lies.

Modelled on tiatoolbox's IO description (patch shape, stride, resolution together): the scan, the
outputs and the tests all ask this object where a cell is, so no second copy of the arithmetic exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from histoscan.errors import ConfigError
from histoscan.preprocessing import Preprocessing
from histoscan.wsi.reader import Bounds, SlideError
from histoscan.wsi.resolution import LevelChoice

# What one slide's grid may cost before anything is allocated. The scan holds a few arrays per cell
# (tissue fraction, scanned flag, probability, order: ~24 bytes) plus per scanned cell its tiles.csv row;
# 48 bytes a cell is the conservative sum. 25 M cells is a 160,000 px slide at 1 um/px with 8 px steps.
GRID_MAX_CELLS = 25_000_000
GRID_BYTES_PER_CELL = 48
GRID_MAX_BYTES = 1_500_000_000


@dataclass(frozen=True)
class TileSpec:
    """What the model sees, in model pixels: the context tile, its labelled centre, and the step between tiles."""

    tile: int
    label: int
    stride: int

    @classmethod
    def for_model(
        cls, pre: Preprocessing, tile: int | None = None, stride: int | None = None, overlap: int | None = None
    ) -> TileSpec:
        """Defaults from the bundle: tile = image_size, label = label_size (else the whole tile), stride = label.

        ``tile`` must equal the model's image_size (tiles are read at the model's size so the Predictor
        never resizes); ``stride`` or ``overlap`` (= tile - stride) change the step for whole-tile labels.
        """
        size = int(pre.image_size[0])
        if tile is not None and tile != size:
            raise ConfigError(
                f"--tile {tile}: the model takes {size} px inputs; read a larger field of view with a coarser "
                "--model-mpp instead"
            )
        label = int(pre.label_size) if pre.label_size else size
        if label <= 0 or label > size:
            raise ConfigError(f"model.json preprocessing.label_size {label} must be between 1 and {size}")
        if stride is not None and overlap is not None:
            raise ConfigError("give --stride or --overlap, not both")
        step = stride if stride is not None else (size - overlap if overlap is not None else label)
        if step <= 0 or step > size:
            raise ConfigError(f"stride {step} must be between 1 and the tile side {size}")
        return cls(size, label, int(step))

    @property
    def margin(self) -> float:
        """Context on each side of a cell, in model pixels."""
        return (self.tile - self.stride) / 2.0


@dataclass(frozen=True)
class SlideGrid:
    """The heatmap grid over a slide's scanned area, with the level read and its resampling.

    Cell (row, col) is the ``stride``-sided square whose centre is the centre of one tile; with the
    default stride (= the labelled centre) it is exactly the area the label describes.
    """

    spec: TileSpec
    bounds: Bounds
    level: LevelChoice
    slide_mpp: float
    rows: int
    cols: int
    mpp_source: str = "metadata"  # where slide_mpp came from (see resolution.SlideResolution)

    @classmethod
    def over(
        cls, spec: TileSpec, bounds: Bounds, level: LevelChoice, slide_mpp: float, mpp_source: str = "metadata"
    ) -> SlideGrid:
        """Cells covering ``bounds`` completely (the last row and column run past its edge)."""
        scale = level.downsample * level.factor
        cell = spec.stride * scale
        return cls(
            spec,
            bounds,
            level,
            slide_mpp,
            max(1, math.ceil(bounds.height / cell)),
            max(1, math.ceil(bounds.width / cell)),
            mpp_source,
        )

    def check_budget(self, path: object, max_cells: int = GRID_MAX_CELLS, max_bytes: int = GRID_MAX_BYTES) -> None:
        """Refuse a grid over budget (cells or bytes) before anything is allocated for it."""
        cells = self.rows * self.cols
        need = cells * GRID_BYTES_PER_CELL
        if cells > max_cells or need > max_bytes:
            raise SlideError(
                f"{path}: at {self.slide_mpp:.4g} um/px ({self.mpp_source}) the grid would be {self.rows:,} x "
                f"{self.cols:,} = {cells:,} cells (~{need / 1e9:.1f} GB), over the budget of {max_cells:,} cells "
                f"/ {max_bytes / 1e9:.1f} GB; check the slide's resolution (give the true one with "
                "--slide-mpp-override) or use a larger --stride"
            )

    @property
    def scale(self) -> float:
        """Level-0 pixels per model pixel."""
        return self.level.downsample * self.level.factor

    @property
    def cell_px(self) -> float:
        """Side of a heatmap cell in level-0 pixels."""
        return self.spec.stride * self.scale

    @property
    def cell_um(self) -> float:
        """Side of a heatmap cell in micrometres."""
        return self.cell_px * self.slide_mpp

    @property
    def model_mpp(self) -> float:
        """The resolution the model actually sees (um/px)."""
        return self.scale * self.slide_mpp

    def boxes(self, rows: np.ndarray, cols: np.ndarray, side: float) -> np.ndarray:
        """Level-0 (x, y, w, h) of squares of ``side`` model px centred on the given cells (float64 N x 4)."""
        s = self.spec.stride
        cx = self.bounds.x + (cols + 0.5) * s * self.scale
        cy = self.bounds.y + (rows + 0.5) * s * self.scale
        half = side * self.scale / 2.0
        w = np.full(len(cx), 2 * half)
        return np.stack([cx - half, cy - half, w, w], axis=1)

    def cell_boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Heatmap cells (stride squares)."""
        return self.boxes(rows, cols, self.spec.stride)

    def label_boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The labelled centres of the tiles."""
        return self.boxes(rows, cols, self.spec.label)

    def tile_boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The context tiles read around the cells."""
        return self.boxes(rows, cols, self.spec.tile)

    def blocks(self, size: int) -> Iterator[tuple[int, int, int, int]]:
        """(row0, row1, col0, col1) blocks of at most ``size`` x ``size`` cells, row-major."""
        for r0 in range(0, self.rows, size):
            for c0 in range(0, self.cols, size):
                yield r0, min(self.rows, r0 + size), c0, min(self.cols, c0 + size)

    def block_region(self, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int, int, int]:
        """What to read for a block: level-0 (x, y), level size (w, h), and model size (w, h)."""
        s, m = self.spec.stride, self.spec.margin
        mw, mh = (c1 - c0) * s + self.spec.tile - s, (r1 - r0) * s + self.spec.tile - s
        x = self.bounds.x + (c0 * s - m) * self.scale
        y = self.bounds.y + (r0 * s - m) * self.scale
        f = self.level.factor
        return round(x), round(y), max(1, round(mw * f)), max(1, round(mh * f)), mw, mh
