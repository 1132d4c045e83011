"""Alignment: every heatmap cell, tiles.csv row and GeoJSON vertex maps to the right level-0 place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from shapely.geometry import box, shape
from shapely.ops import unary_union

from histoscan.wsi import scan as scan_module
from histoscan.wsi.reader import Bounds, ImageReader, SlideError, open_slide
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import write_slide
from tests.wsi_helpers import CoordinatePredictor, coordinate_image

OUTSIDE = (4095, 4095)  # what a white (background) pixel decodes to


def code(x: int, y: int) -> float:
    """A distinct probability per level-0 position."""
    return ((x * 7919 + y) % 100_003) / 100_003


def full_mask(tmp: Path, w: int, h: int) -> Path:
    path = tmp / "mask.png"
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def coord_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 x 700 px (not a multiple of the 32 px cell or the 96 px tile), levels 1 and 2, 1 um/px."""
    path = tmp_path_factory.mktemp("coord") / "coords.tif"
    write_slide(path, coordinate_image(700, 1000), 1.0, (1, 2))
    reader = open_slide(path)
    assert len(reader.level_downsamples) >= 2
    reader.close()
    return path


def test_tiles_cells_and_grid_map_to_their_level0_pixels(coord_slide: Path, tmp_path: Path) -> None:
    pred = CoordinatePredictor(code)
    settings = ScanSettings(mask=str(full_mask(tmp_path, 100, 70)), min_tissue=0.1, workers=2, batch_size=64)
    r = scan_slide(pred, coord_slide, tmp_path / "out", settings)
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert r.summary["grid"] == [22, 32]  # ceil(700 / 32), ceil(1000 / 32): edge cells kept
    assert r.summary["level"] == 0 and r.summary["resample_factor"] == 1.0
    assert len(tiles) == 22 * 32
    cx, cy = tiles.x + tiles.width / 2, tiles.y + tiles.height / 2
    assert np.allclose(tiles.width, 32) and np.allclose(tiles.tile_width, 96)
    assert np.allclose(tiles.tile_x + 48, cx) and np.allclose(tiles.tile_y + 48, cy)
    inside = (cx < 1000) & (cy < 700)
    expected = [
        code(int(x), int(y)) if ok else code(*OUTSIDE) for x, y, ok in zip(cx, cy, inside, strict=True)
    ]  # centres past the edge read the white padding, never black
    assert np.allclose(tiles.probability, expected, atol=1e-6)
    assert (~inside).sum() > 0
    meta = json.loads((r.folder / "probabilities.json").read_text())
    grid = tifffile.imread(r.folder / "probabilities.tif")
    assert grid.shape == (meta["rows"], meta["cols"]) and grid.dtype == np.float32
    ox, oy = meta["origin_level0_px"]
    c = meta["cell_level0_px"]
    for row, col in [(0, 0), (5, 7), (21, 30), (10, 31)]:
        x, y = int(ox + (col + 0.5) * c), int(oy + (row + 0.5) * c)
        want = code(x, y) if x < 1000 and y < 700 else code(*OUTSIDE)
        assert grid[row, col] == pytest.approx(want, abs=1e-6)


def test_whole_tiles_are_read_in_place(coord_slide: Path, tmp_path: Path) -> None:
    """Every pixel of every tile inside the slide decodes to its own level-0 position."""
    tiles_seen: list[np.ndarray] = []

    class Recording(CoordinatePredictor):
        def predict_batch(self, images, tta=None, groups=None):  # type: ignore[no-untyped-def]
            tiles_seen.extend(images.copy())
            return super().predict_batch(images, tta, groups)

    pred = Recording(code)
    settings = ScanSettings(mask=str(full_mask(tmp_path, 100, 70)), min_tissue=0.1, workers=3)
    scan_slide(pred, coord_slide, tmp_path / "out", settings)
    from tests.wsi_helpers import decode

    checked = 0
    for tile, (x, y) in zip(tiles_seen, pred.seen, strict=True):
        if (x, y) == OUTSIDE:
            continue
        for i, j in [(0, 0), (0, 95), (95, 0), (95, 95), (20, 70)]:
            lx, ly = x - 48 + j, y - 48 + i
            if 0 <= lx < 1000 and 0 <= ly < 700:
                assert decode(tile[i, j]) == (lx, ly)
                checked += 1
            else:
                assert tuple(tile[i, j]) == (255, 255, 255)
    assert checked > 1000


def _regions(path: Path) -> list[dict]:
    return [f for f in json.loads(path.read_text())["features"] if f["properties"]["objectType"] == "annotation"]


def test_geojson_vertices_match_the_cells_above_threshold(tmp_path: Path) -> None:
    slide = write_slide(
        tmp_path / "coords1010.tif", coordinate_image(700, 1010), 1.0, (1, 2)
    )  # last cell centre inside

    def ring(x: int, y: int) -> float:  # a square ring of tumour cells running past the right edge
        outer = 200 <= x < 1100 and 96 <= y < 480
        hole = 400 <= x < 560 and 224 <= y < 352
        return 0.9 if outer and not hole else 0.1

    pred = CoordinatePredictor(ring)
    settings = ScanSettings(mask=str(full_mask(tmp_path, 100, 70)), min_tissue=0.1, geojson_tiles=True)
    r = scan_slide(pred, slide, tmp_path / "out", settings)
    regions = _regions(r.folder / "regions.geojson")
    assert len(regions) == 1
    poly = shape(regions[0]["geometry"])
    assert poly.is_valid and len(poly.interiors) == 1
    tiles = pd.read_csv(r.folder / "tiles.csv")
    hot = tiles[tiles.probability > 0.5]
    expected = unary_union([box(x, y, x + w, y + h) for x, y, w, h in hot[["x", "y", "width", "height"]].values])
    expected = expected.intersection(box(0, 0, 1010, 700))
    assert poly.symmetric_difference(expected).area < 1e-6
    assert poly.bounds[2] == 1010  # clipped at the slide's right edge
    props = regions[0]["properties"]
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's class and colour
    assert props["measurements"]["area_um2"] == pytest.approx(expected.area, rel=1e-6)
    assert props["measurements"]["max_probability"] == pytest.approx(0.9)
    tile_objects = [
        f
        for f in json.loads((r.folder / "regions.geojson").read_text())["features"]
        if f["properties"]["objectType"] == "tile"
    ]
    assert len(tile_objects) == len(tiles)
    first = shape(tile_objects[0]["geometry"])
    assert first.area == pytest.approx(32 * 32)  # the labelled centre, not the context tile


def test_offset_slide_writes_qupath_coordinates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide whose scanned area starts at (64, 32) (as MRXS): the grid starts there, GeoJSON is relative to it."""
    png = tmp_path / "offset.png"
    Image.fromarray(coordinate_image(600, 800)).save(png)

    def offset_reader(path: object) -> ImageReader:
        reader = ImageReader(png)
        reader.bounds = Bounds(64, 32, 640, 480)
        reader.mpp = 1.0
        return reader

    monkeypatch.setattr(scan_module, "open_slide", offset_reader)

    def square(x: int, y: int) -> float:
        return 0.9 if 256 <= x < 384 and 160 <= y < 288 else 0.1

    pred = CoordinatePredictor(square)
    r = scan_slide(pred, png, tmp_path / "out", ScanSettings(mask=str(full_mask(tmp_path, 80, 60))))
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert tiles.x.min() == 64 and tiles.y.min() == 32  # level-0 coordinates start at the bounds
    assert (tiles.x + tiles.width).max() <= 64 + 640 and (tiles.y + tiles.height).max() <= 32 + 480
    (region,) = _regions(r.folder / "regions.geojson")
    # cells start at 64 + 32 k and 32 + 32 k; the hot ones are level-0 [256, 384) x [160, 288)
    assert shape(region["geometry"]).bounds == (256 - 64, 160 - 32, 384 - 64, 288 - 32)


def test_slide_without_resolution_needs_slide_mpp(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "nompp.tif", coordinate_image(200, 300), None, (1, 2))
    settings = ScanSettings(mask=str(full_mask(tmp_path, 30, 20)))
    with pytest.raises(SlideError, match="--slide-mpp") as e:
        scan_slide(CoordinatePredictor(code), slide, tmp_path / "out", settings)
    assert "nompp.tif" in str(e.value) and "\n" not in str(e.value)
    settings.slide_mpp = 0.5  # the model's 1 um/px is then the 2x level
    r = scan_slide(CoordinatePredictor(code), slide, tmp_path / "out", settings)
    assert r.summary["level"] == 1 and r.summary["slide_mpp"] == 0.5
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert np.allclose(tiles.width, 64)  # 32 model px at 1 um/px = 64 level-0 px at 0.5 um/px
