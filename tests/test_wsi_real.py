"""The two real SVS files in ../shared/data/wsi: tissue masks and end-to-end scans with the fixture model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from histoscan.inference.predictor import Predictor
from histoscan.wsi.batch import run_slides
from histoscan.wsi.reader import SlideError, open_slide
from histoscan.wsi.scan import ScanSettings, plan_grid, scan_slide, tissue_mask
from tests.conftest import shared
from tests.wsi_helpers import train_mosaic_run

# Every test here scans with the mosaic model that train_mosaic_run trains (about 15 s): the slow tier.
# The fast lane scans slides through test_wsi_alignment.py, without a trained model.
pytestmark = pytest.mark.slow

CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_mosaic_run(tmp_path_factory)


@pytest.mark.parametrize(("name", "mpp"), [(CMU, None), (TCGA, 0.5)])
def test_tissue_mask_is_neither_empty_nor_the_whole_slide(run: Path, name: str, mpp: float | None) -> None:
    reader = open_slide(shared("wsi") / name)
    settings = ScanSettings(slide_mpp=mpp)
    grid = plan_grid(reader, Predictor(run, backend="torch"), settings)
    mask, _ = tissue_mask(reader, grid, settings)
    assert 0.05 < mask.mask.mean() < 0.95, f"{name}: tissue fraction {mask.mask.mean():.3f}"
    reader.close()


def test_cmu_scans_end_to_end(run: Path, tmp_path: Path) -> None:
    r = scan_slide(Predictor(run, backend="torch"), shared("wsi") / CMU, tmp_path, ScanSettings())
    s = r.summary
    assert s["slide_mpp"] == pytest.approx(0.499) and s["level"] == 0  # one level: read level 0, shrink ~2x
    assert s["resample_factor"] == pytest.approx(1.0 / 0.499, rel=1e-3)
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert len(tiles) == s["tiles"] > 100
    assert tiles.width.iloc[0] == pytest.approx(32 / 0.499, rel=1e-3)  # 32 model px at 1 um/px in level-0 px
    assert (tiles.x >= -1).all() and (tiles.x + tiles.width <= 2220 + tiles.width).all()


def test_tcga_needs_slide_mpp_and_works_with_it(run: Path, tmp_path: Path) -> None:
    slide = shared("wsi") / TCGA
    with pytest.raises(SlideError, match="--slide-mpp") as e:
        scan_slide(Predictor(run, backend="torch"), slide, tmp_path, ScanSettings())
    assert TCGA in str(e.value)
    r = run_slides(
        lambda: Predictor(run, backend="torch"), [slide], tmp_path, ScanSettings(slide_mpp=0.5), printer=lambda *_: None
    )
    (done,) = r.scanned
    summary = json.loads((done.folder / "summary.json").read_text())
    assert summary["level"] == 1 and summary["resample_factor"] == 1.0  # its 2x level is within 5% of 1 um/px
    assert summary["tiles"] > 100 and summary["tissue_mm2"] > 0
