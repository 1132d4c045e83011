"""Outputs as the ecosystem takes them: QuPath-importable GeoJSON with RFC 7946 winding, and an OME-TIFF pyramid."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from shapely.geometry import LinearRing, box, shape
from shapely.ops import unary_union

from histoscan.wsi.scan import ScanSettings, SlideResult, scan_slide
from histoscan.wsi.synthetic import write_slide
from tests.wsi_helpers import CoordinatePredictor, coordinate_image

CELL = 32  # level-0 px per heatmap cell (1 um/px slide, 1 um/px model, 32 px labelled centre)


def annulus(x: int, y: int) -> float:
    """A ring of tumour around (500, 350): outer radius 250, a hole of radius 90."""
    d = np.hypot(x - 500, y - 350)
    return 0.9 if 90 <= d < 250 else 0.1


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> SlideResult:
    tmp = tmp_path_factory.mktemp("outputs")
    slide = write_slide(tmp / "ring.tif", coordinate_image(700, 1000), 1.0, (1, 2))
    mask = tmp / "mask.png"
    Image.fromarray(np.full((70, 100), 255, np.uint8)).save(mask)
    settings = ScanSettings(mask=str(mask), min_tissue=0.1, geojson_tiles=True)
    return scan_slide(CoordinatePredictor(annulus), slide, tmp / "out", settings)


def _check_qupath_object(feature: dict) -> None:
    """The layout QuPath's GeoJSON import reads (as its own export writes it)."""
    assert feature["type"] == "Feature" and isinstance(feature.get("id"), str)
    geometry, props = feature["geometry"], feature["properties"]
    assert geometry["type"] in ("Polygon", "MultiPolygon") and isinstance(geometry["coordinates"], list)
    assert props["objectType"] in ("annotation", "tile", "detection")
    assert all(isinstance(v, float | int) for v in props["measurements"].values())
    if "classification" in props:
        c = props["classification"]
        assert set(c) == {"name", "color"} and isinstance(c["name"], str)
        assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])


def test_regions_are_qupath_tumor_annotations_simplified_valid_and_wound_as_rfc7946(scanned: SlideResult) -> None:
    data = json.loads((scanned.folder / "regions.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    for feature in data["features"]:
        _check_qupath_object(feature)
    regions = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(regions) == 1
    props = regions[0]["properties"]
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    poly = shape(regions[0]["geometry"])
    assert poly.geom_type == "Polygon" and poly.is_valid and len(poly.interiors) == 1
    # counter-clockwise exterior and clockwise holes, judged on the coordinates exactly as written
    written = regions[0]["geometry"]["coordinates"]
    assert LinearRing(written[0]).is_ccw and not LinearRing(written[1]).is_ccw
    assert all(LinearRing(ring).is_simple for ring in written)  # no self-intersections
    # the cells it stands for, as tiles.csv places them
    tiles = pd.read_csv(scanned.folder / "tiles.csv")
    hot = tiles[tiles.probability > 0.5]
    cells = unary_union([box(x, y, x + w, y + h) for x, y, w, h in hot[["x", "y", "width", "height"]].values])
    corners = len(cells.exterior.coords) + sum(len(r.coords) for r in cells.interiors)
    vertices = sum(len(r) for r in written)
    assert vertices < 0.6 * corners  # staircases became their diagonals (86 cell corners -> 42 here)
    assert poly.hausdorff_distance(cells) <= CELL / 2 + 1e-6  # within half a cell of the cells
    assert poly.symmetric_difference(cells).area < 0.1 * cells.area
    assert props["measurements"]["area_um2"] == pytest.approx(cells.area)  # measured on the cells (1 um/px)
    assert props["measurements"]["max_probability"] == pytest.approx(0.9)


def test_probabilities_are_a_pyramidal_ome_tiff_with_physical_size_and_position(scanned: SlideResult) -> None:
    meta = json.loads((scanned.folder / "probabilities.json").read_text())  # the side file stays
    with tifffile.TiffFile(scanned.folder / "probabilities.tif") as tf:
        assert tf.is_ome
        levels = tf.series[0].levels
        assert len(levels) >= 2
        level0 = levels[0].asarray()
        shapes = [lv.shape for lv in levels]
        ome = ET.fromstring(tf.ome_metadata)
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = ome.find(".//ome:Pixels", ns)
    plane = ome.find(".//ome:Plane", ns)
    assert pixels is not None and plane is not None
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(CELL * 1.0)  # um per cell
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(CELL * 1.0)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    assert (float(plane.get("PositionX")), float(plane.get("PositionY"))) == (0.0, 0.0)
    assert plane.get("PositionXUnit") == "µm"
    assert level0.shape == (meta["rows"], meta["cols"]) and shapes[1] == (
        (level0.shape[0] + 1) // 2,
        (level0.shape[1] + 1) // 2,
    )
    tiles = pd.read_csv(scanned.folder / "tiles.csv")
    assert np.allclose(level0[tiles.row, tiles.col], tiles.probability, atol=1e-6)
    assert np.isnan(level0).sum() == level0.size - len(tiles)  # unscanned cells are NaN
    assert meta["origin_um"] == [0.0, 0.0] and meta["pyramid_levels"][0] == list(level0.shape)
