"""``histoscan slide --explain-top K``: overlays of the K most suspicious tiles of a slide."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoscan.cli import app
from histoscan.errors import ConfigError
from histoscan.inference.predictor import Predictor
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import tumour_slide
from tests.wsi_helpers import MODEL_MPP, train_mosaic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_mosaic_run(tmp_path_factory)


@pytest.mark.slow
def test_explain_top_writes_overlays_of_the_most_suspicious_tiles(run: Path, tmp_path: Path) -> None:
    path, _ = tumour_slide(tmp_path / "a.tif", 10, 12, (2, 8, 3, 9), MODEL_MPP, seed=1)
    r = scan_slide(Predictor(run, backend="torch"), path, tmp_path / "out", ScanSettings(explain_top=3))
    folder = r.folder / "explain"
    top = pd.read_csv(folder / "tiles.csv")
    assert list(top["rank"]) == [1, 2, 3]
    tiles = pd.read_csv(r.folder / "tiles.csv").sort_values("probability", ascending=False, kind="stable")
    assert top["probability"].tolist() == pytest.approx(tiles["probability"].head(3).tolist(), abs=1e-5)
    assert (top[["row", "col"]].to_numpy() == tiles[["row", "col"]].head(3).to_numpy()).all()
    for name in top["png"]:
        with Image.open(folder / name) as im:
            assert im.size[0] > 3 * 96


def test_explain_top_option_and_its_check() -> None:
    assert "--explain-top" in CliRunner().invoke(app, ["slide", "scan", "--help"]).output
    with pytest.raises(ConfigError, match="--explain-top"):
        ScanSettings(explain_top=-1)
