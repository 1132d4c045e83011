"""Tumour annotations of a slide: lesions and exclusion regions from QuPath GeoJSON or ASAP XML (Camelyon16).

Coordinates come back in level-0 pixels of the slide. QuPath writes them relative to the slide's
bounds origin (MRXS and other cropped formats), so GeoJSON is shifted by ``origin``; ASAP XML is
already in level-0 pixels.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoscan.errors import DataError

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
TUMOUR_NAMES = ("tumor", "tumour", "metastasis", "metastases", "_0", "_1", "tumor_group", "positive")
EXCLUSION_NAMES = ("exclusion", "_2", "ignore", "exclude", "normal inside tumour", "normal inside tumor")


@dataclass
class Annotations:
    """A slide's lesions (one polygon each, exclusions cut out) and its exclusion area, in level-0 px."""

    lesions: list[Any]  # shapely Polygons
    exclusion: Any  # a shapely geometry (empty when none)
    source: str


def _kind(name: str | None, path: Path) -> str:
    """'tumour' or 'exclusion' for a class or group name; unclassified drawings are tumour."""
    if name is None or not str(name).strip():
        return "tumour"
    n = str(name).strip().lower()
    if n in TUMOUR_NAMES:
        return "tumour"
    if n in EXCLUSION_NAMES:
        return "exclusion"
    raise DataError(
        f"{path}: annotation class/group {name!r} is neither tumour ({', '.join(TUMOUR_NAMES[:2])}, or "
        "Camelyon16's _0/_1) nor exclusion (Exclusion, or Camelyon16's _2); rename it or remove it"
    )


def _geojson(path: Path, origin: tuple[float, float]) -> tuple[list[Any], list[Any]]:
    from shapely import affinity
    from shapely.geometry import shape

    try:
        data = json.loads(path.read_text())
        features = (
            data if isinstance(data, list) else data["features"] if data.get("type") == "FeatureCollection" else [data]
        )
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise DataError(f"{path}: not a GeoJSON FeatureCollection ({type(exc).__name__}: {exc})") from exc
    tumour: list[Any] = []
    exclusion: list[Any] = []
    for i, f in enumerate(features):
        try:
            geom = shape(f["geometry"])
        except Exception as exc:  # shapely raises several types for malformed geometry
            raise DataError(f"{path}: feature {i} has no readable geometry ({type(exc).__name__}: {exc})") from exc
        props = f.get("properties") or {}
        if props.get("objectType") == "tile":
            continue  # histoscan's own per-cell tile objects are not annotations
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else cls
        geom = affinity.translate(geom, origin[0], origin[1])
        (tumour if _kind(name, path) == "tumour" else exclusion).append(geom)
    return tumour, exclusion


def _asap(path: Path) -> tuple[list[Any], list[Any]]:
    from shapely.geometry import Polygon

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: not readable XML ({exc})") from exc
    tumour: list[Any] = []
    exclusion: list[Any] = []
    for i, ann in enumerate(root.iter("Annotation")):
        try:
            pts = sorted(
                (
                    (int(c.get("Order", k)), float(c.get("X", "")), float(c.get("Y", "")))
                    for k, c in enumerate(ann.iter("Coordinate"))
                ),
            )
        except ValueError as exc:
            raise DataError(f"{path}: annotation {i} has a coordinate that is not a number") from exc
        if len(pts) < 3:
            raise DataError(f"{path}: annotation {i} ({ann.get('Name')!r}) has {len(pts)} points; a region needs 3")
        poly = Polygon([(x, y) for _, x, y in pts])
        (tumour if _kind(ann.get("PartOfGroup"), path) == "tumour" else exclusion).append(poly)
    return tumour, exclusion


def read_annotations(path: str | Path, origin: tuple[float, float] = (0.0, 0.0)) -> Annotations:
    """Lesions and exclusions of one slide: tumour regions unioned, exclusions cut out, split into parts.

    Args:
        path: a QuPath GeoJSON (.geojson/.json) or ASAP XML (.xml, as Camelyon16 ships them).
        origin: the slide's bounds origin in level-0 px (QuPath's coordinates start there).
    """
    from shapely import make_valid, union_all
    from shapely.geometry import GeometryCollection

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: annotation file not found")
    if p.suffix.lower() not in ANNOTATION_SUFFIXES:
        raise DataError(f"{p}: annotations are QuPath GeoJSON (.geojson) or ASAP XML (.xml)")
    tumour, exclusion = _asap(p) if p.suffix.lower() == ".xml" else _geojson(p, origin)
    tumour = [make_valid(g) for g in tumour]
    excl = union_all([make_valid(g) for g in exclusion]) if exclusion else GeometryCollection()
    region = union_all(tumour) if tumour else GeometryCollection()
    if not excl.is_empty:
        region = region.difference(excl)
    lesions = [g for g in getattr(region, "geoms", [region]) if g.geom_type == "Polygon" and g.area > 0]
    return Annotations(lesions, excl, str(p))


def annotation_for(folder: str | Path, slide: str) -> Path | None:
    """``folder/<slide>.geojson|.json|.xml``, or None (a slide without annotations has no lesions)."""
    for suffix in ANNOTATION_SUFFIXES:
        p = Path(folder) / f"{slide}{suffix}"
        if p.is_file():
            return p
    return None
