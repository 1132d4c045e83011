"""Slide-level evaluation with a bootstrap interval, and Camelyon16's lesion FROC on generated slides with known lesions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoscan.errors import DataError
from histoscan.wsi.batch import collect
from histoscan.wsi.evaluate import SlideEvaluationSettings, evaluate_slides, froc
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import write_slide
from tests.wsi_helpers import CoordinatePredictor, coordinate_image

# Known lesions (level-0 px, 1 um/px, 32 px cells) and what the stand-in model "sees" on each slide.
L1, L2 = (64, 64, 160, 160), (320, 64, 416, 160)  # slide a: two lesions, found at P 0.9 and 0.7
EXCLUDED_SPOT, EXCLUSION = (192, 256, 256, 320), (160, 224, 288, 352)  # slide a: P 0.95 inside an exclusion region
L3, FP_B = (400, 224, 512, 320), (64, 64, 128, 128)  # slide b: a missed lesion, and a false positive at P 0.8
FP_C = (320, 224, 384, 288)  # slide c (normal): a false positive at P 0.6


def spots(*items: tuple[tuple[int, int, int, int], float]):  # type: ignore[no-untyped-def]
    def probability(x: int, y: int) -> float:
        for (x0, y0, x1, y1), p in items:
            if x0 <= x < x1 and y0 <= y < y1:
                return p
        return 0.1

    return probability


def square(b: tuple[int, int, int, int]) -> list[list[float]]:
    x0, y0, x1, y1 = b
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def asap(groups: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    anns = []
    for i, (group, b) in enumerate(groups):
        coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(square(b)[:4]))
        anns.append(
            f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    return f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(anns)}</Annotations></ASAP_Annotations>'


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("froc")
    mask = tmp / "mask.png"
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(mask)
    out = tmp / "scans"
    models = {
        "a": spots((L1, 0.9), (L2, 0.7), (EXCLUDED_SPOT, 0.95)),
        "b": spots((FP_B, 0.8)),
        "c": spots((FP_C, 0.6)),
    }
    for name, probability in models.items():
        path = write_slide(tmp / f"{name}.tif", coordinate_image(400, 600), 1.0, (1, 2))
        scan_slide(CoordinatePredictor(probability), path, out, ScanSettings(mask=str(mask), min_tissue=0.1))
    collect(out)
    ann = tmp / "annotations"
    ann.mkdir()
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(b)]}, "properties": props}
        for b, props in [
            (L1, {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}),
            (L2, {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}),
            (EXCLUSION, {"objectType": "annotation", "classification": {"name": "Exclusion", "color": [0, 0, 0]}}),
        ]
    ]
    (ann / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (ann / "b.xml").write_text(asap([("_0", L3), ("_2", (500, 0, 560, 40))]))  # Camelyon16: _2 is an exclusion
    return out, ann  # slide c has no annotation file: a normal slide


@pytest.mark.slow  # three scanned slides in the fixture: about 6 s
def test_lesion_froc_and_slide_level_figures_on_known_lesions(scans: tuple[Path, Path]) -> None:
    out, ann = scans
    ev = evaluate_slides(out / "slides.csv", settings=SlideEvaluationSettings(annotations=ann, bootstrap=200))
    # labels from the annotations: a and b hold lesions, c none
    assert (ev.slides, ev.positives) == (3, 2)
    assert ev.lesions == 3 and ev.detections == 4  # the excluded spot counts neither way
    # operating points: 0.9 -> 1/3 found, 0 FP; 0.8 -> 1 FP; 0.7 -> 2/3 found; 0.6 -> 2 FP (of 3 slides)
    assert ev.froc == pytest.approx({0.25: 1 / 3, 0.5: 2 / 3, 1.0: 2 / 3, 2.0: 2 / 3, 4.0: 2 / 3, 8.0: 2 / 3})
    assert ev.froc_score == pytest.approx(np.mean([1 / 3] + [2 / 3] * 5))
    assert ev.auroc["max_probability"] == 1.0  # a 0.95, b 0.8 against c 0.6
    lo, hi = ev.auroc_ci["max_probability"]
    assert lo <= 1.0 <= hi + 1e-12
    assert ev.threshold == 0.5 and ev.sensitivity == 1.0 and ev.specificity == 0.0  # c reaches 0.6 >= 0.5
    assert "lesion FROC (3 lesions" in "\n".join(ev.lines())
    strict = evaluate_slides(
        out / "slides.csv", settings=SlideEvaluationSettings(annotations=ann, bootstrap=0, threshold=0.65)
    )
    assert strict.sensitivity == 1.0 and strict.specificity == 1.0


@pytest.mark.slow  # three scanned slides in the fixture: about 6 s
def test_labels_csv_with_annotations_and_bad_annotation_files(scans: tuple[Path, Path], tmp_path: Path) -> None:
    out, ann = scans
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide": ["a.tif", "b", "c"], "label": ["tumor", "tumor", "normal"]}).to_csv(labels, index=False)
    ev = evaluate_slides(out / "slides.csv", labels, SlideEvaluationSettings(annotations=ann, bootstrap=0))
    assert ev.positives == 2 and ev.froc is not None
    pd.DataFrame({"slide": ["a", "b", "c"], "label": [1, 1, 1]}).to_csv(labels, index=False)
    with pytest.raises(DataError, match="have no annotation file"):
        evaluate_slides(out / "slides.csv", labels, SlideEvaluationSettings(annotations=ann))
    odd = tmp_path / "odd"
    odd.mkdir()
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(L1)]}}
    feature["properties"] = {"classification": {"name": "Stroma"}}
    (odd / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(DataError, match=r"a\.geojson.*'Stroma' is neither tumour"):
        evaluate_slides(out / "slides.csv", settings=SlideEvaluationSettings(annotations=odd))
    (odd / "a.geojson").unlink()
    (odd / "a.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(DataError, match=r"a\.xml: not readable XML"):
        evaluate_slides(out / "slides.csv", settings=SlideEvaluationSettings(annotations=odd))
    with pytest.raises(DataError, match="give slide labels"):
        evaluate_slides(out / "slides.csv")


def test_froc_counts_ties_together_and_steps_without_interpolation() -> None:
    hits = [(0.9, [(0, 0)]), (0.9, None), (0.5, [(1, 0)]), (0.4, None), (0.4, None)]
    curve = froc(hits, n_lesions=2, n_slides=2, rates=(0.25, 0.5, 1.0, 2.0))
    assert curve == {0.25: 0.0, 0.5: 1.0, 1.0: 1.0, 2.0: 1.0}


@pytest.mark.slow  # three scanned slides in the fixture: about 6 s
def test_slide_evaluate_cli_runs_the_froc_from_a_folder_or_files(scans: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histoscan.cli import app

    out, ann = scans
    runner = CliRunner()
    res = runner.invoke(app, ["slide", "evaluate", str(out), "--annotations", str(ann), "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    expected = evaluate_slides(out, settings=SlideEvaluationSettings(annotations=ann, bootstrap=50))
    assert expected.froc_score is not None and "lesion FROC (3 lesions" in res.output
    for line in expected.lines():  # the same figures as the Python call
        assert line in res.output, line
    files = ["--annotations", str(ann / "a.geojson"), "--annotations", str(ann / "b.xml")]
    res = runner.invoke(app, ["slide", "evaluate", str(out), *files, "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "lesion FROC (3 lesions" in res.output and "95% CI" not in res.output  # no resamples: no interval
    stray = tmp_path / "z.xml"
    stray.write_text((ann / "b.xml").read_text())
    res = runner.invoke(app, ["slide", "evaluate", str(out), "--annotations", str(stray)])
    assert res.exit_code == 2 and "z.xml: names no scanned slide" in res.output
    res = runner.invoke(app, ["slide", "evaluate", str(out)])
    assert res.exit_code == 2 and "give slide labels" in res.output
