"""Scanning synthetic slides with a tiny trained model: recovery, outputs, many slides, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from shapely.geometry import box, shape
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.cli import app
from histoscan.inference.predictor import Predictor
from histoscan.wsi import outputs
from histoscan.wsi.batch import collect, run_slides
from histoscan.wsi.scan import ScanSettings, scan_slide
from histoscan.wsi.synthetic import tumour_slide, write_slide
from tests.wsi_helpers import MODEL_MPP, train_mosaic_run

# Every test here scans with the mosaic model that train_mosaic_run trains (about 15 s): the slow tier.
# The fast lane scans slides through test_wsi_alignment.py, without a trained model.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_mosaic_run(tmp_path_factory)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small slides (two with tumour) at the model's resolution, in one folder."""
    root = tmp_path_factory.mktemp("slides")
    tumour_slide(root / "a.tif", 12, 14, (3, 9, 3, 10), MODEL_MPP, seed=1)
    tumour_slide(root / "b.tif", 10, 10, (0, 0, 0, 0), MODEL_MPP, seed=2)
    tumour_slide(root / "c.tif", 12, 12, (2, 10, 2, 10), MODEL_MPP, seed=3)
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_tiny_model_recovers_a_known_tumour_region(run: Path, tmp_path: Path) -> None:
    # level 0 at 0.5 um/px with a 2x level at the model's 1.0 um/px: the scan must read level 1
    path, truth = tumour_slide(
        tmp_path / "slide.tif", 24, 30, (5, 19, 6, 22), 0.5, upsample=2, hole=(10, 13, 11, 15), seed=7
    )
    r = scan_slide(Predictor(run, backend="torch"), path, tmp_path / "out", ScanSettings())
    assert r.summary["level"] == 1 and r.summary["resample_factor"] == 1.0
    for name in (
        "heatmap.png",
        "probabilities.tif",
        "probabilities.json",
        "tiles.csv",
        "regions.geojson",
        "summary.json",
    ):
        assert (r.folder / name).is_file(), name
    grid = tifffile.imread(r.folder / "probabilities.tif")
    pred = np.nan_to_num(grid[2:26, 2:32]) >= read_bundle(run).threshold  # the slide has a 2-cell white margin
    assert dice(pred, truth) >= 0.9
    assert np.isnan(grid[0]).all()  # glass is not scanned
    summary = json.loads((r.folder / "summary.json").read_text())
    assert summary["tissue_mm2"] == pytest.approx(24 * 30 * 0.032**2, rel=0.1)
    assert summary["tumour_mm2"] == pytest.approx(truth.sum() * 0.032**2, rel=0.2)
    geo = json.loads((r.folder / "regions.geojson").read_text())
    polys = [shape(f["geometry"]) for f in geo["features"]]
    assert polys and all(p.is_valid for p in polys)
    w, h = summary["bounds"]["width"], summary["bounds"]["height"]
    assert all(box(0, 0, w, h).contains(p) for p in polys)
    assert any(len(p.interiors) > 0 for p in polys)  # the normal hole inside the tumour is kept
    largest = max(geo["features"], key=lambda f: shape(f["geometry"]).area)
    assert largest["properties"]["objectType"] == "annotation" and len(largest["id"]) == 36
    assert largest["properties"]["measurements"]["max_probability"] >= 0.5
    with Image.open(r.folder / "heatmap.png") as im:
        assert im.size[0] > 400


def test_cli_scans_many_slides_resumes_and_lists_failures(run: Path, slides: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(slides, folder)
    (folder / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    blank = np.full((400, 400, 3), 243, np.uint8)
    write_slide(folder / "blank.tif", blank, MODEL_MPP, (1, 2))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["slide", str(run), str(folder), "--out", str(out), "--tta", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "slides.csv")
    assert set(table.slide) == {"a", "b", "c", "corrupt", "blank"}
    failed = table[table.status == "failed"].set_index("slide")
    assert set(failed.index) == {"corrupt", "blank"}
    assert "corrupt.svs" in failed.loc["corrupt", "error"] and "no tissue" in failed.loc["blank", "error"]
    assert {"uncertainty", "answer"} <= set(pd.read_csv(out / "a" / "tiles.csv").columns)
    done = table[table.status == "done"].set_index("slide")
    assert done.loc["a", "max_probability"] > done.loc["b", "max_probability"]
    stamp = (out / "a" / "summary.json").stat().st_mtime_ns
    # the same model and settings (--tta changes results, so it is part of what made them): reused
    again = runner.invoke(app, ["slide", str(run), str(folder), "--out", str(out), "--tta", "--backend", "torch"])
    assert "3 already done" in again.output and (out / "a" / "summary.json").stat().st_mtime_ns == stamp
    forced = runner.invoke(
        app, ["slide", str(run), str(folder / "a.tif"), "--out", str(out), "--force", "--tta", "--backend", "torch"]
    )
    assert forced.exit_code == 0 and (out / "a" / "summary.json").stat().st_mtime_ns != stamp
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,1\nb,0\nc,1\n")
    ev = runner.invoke(app, ["evaluate", str(out / "slides.csv"), "--labels", str(labels)])
    assert ev.exit_code == 0 and "slide-level AUROC (max_probability, 3 slides, 2 tumour): 1.0000" in ev.output


def test_a_killed_scan_leaves_no_complete_looking_output(
    run: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_heatmap", killed)
    predictor = Predictor(run, backend="torch")
    with pytest.raises(KeyboardInterrupt):
        scan_slide(predictor, slides / "a.tif", out, ScanSettings())
    assert not (out / "a").exists() and (out / ".a.partial").exists()
    monkeypatch.undo()
    r = run_slides(lambda: predictor, [slides / "a.tif"], out, ScanSettings(), printer=lambda *_: None)
    assert [s.slide for s in r.scanned] == ["a"] and not (out / ".a.partial").exists()


def test_shards_split_the_work_and_slides_csv_is_gathered_once(run: Path, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    predictor = Predictor(run, backend="torch")
    scanned = []
    for i in range(2):
        r = run_slides(lambda: predictor, [slides], out, ScanSettings(shard=f"{i}/2"), printer=lambda *_: None)
        assert r.slides_csv is None and not (out / "slides.csv").exists()
        scanned += [s.slide for s in r.scanned]
    assert sorted(scanned) == ["a", "b", "c"]
    table = pd.read_csv(collect(out))
    assert sorted(table.slide) == ["a", "b", "c"] and (table.status == "done").all()


def test_model_without_resolution_fails_each_slide_with_the_option_to_give(
    run: Path, slides: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    bundle = read_bundle(bare)
    bundle.preprocessing.mpp = None
    bundle.save(bare)
    out = tmp_path / "out"
    r = run_slides(
        lambda: Predictor(bare, backend="torch"), [slides / "a.tif"], out, ScanSettings(), printer=lambda *_: None
    )
    assert "--model-mpp" in r.failed["a"] and "\n" not in r.failed["a"]
    assert pd.read_csv(out / "slides.csv").status.tolist() == ["failed"]
    ok = run_slides(
        lambda: Predictor(bare, backend="torch"),
        [slides / "a.tif"],
        out,
        ScanSettings(model_mpp=1.0),
        printer=lambda *_: None,
    )
    assert [s.slide for s in ok.scanned] == ["a"]
    assert pd.read_csv(out / "slides.csv").status.tolist() == ["done"]


def test_user_masks_png_and_geojson(run: Path, slides: Path, tmp_path: Path) -> None:
    predictor = Predictor(run, backend="torch")
    slide = slides / "a.tif"  # 18 x 16 cells of 32 px (2-cell margin)
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(wrong)
    with pytest.raises(Exception, match="aspect ratio"):
        scan_slide(predictor, slide, tmp_path / "o1", ScanSettings(mask=str(wrong)))
    half = np.zeros((16 * 8, 18 * 8), np.uint8)
    half[:, : 9 * 8] = 255  # left half of the slide
    png = tmp_path / "half.png"
    Image.fromarray(half).save(png)
    r = scan_slide(predictor, slide, tmp_path / "o2", ScanSettings(mask=str(png)))
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert (tiles.x + tiles.width).max() <= 9 * 32 and len(tiles) == 9 * 16
    region = {"type": "Feature", "geometry": box(64, 64, 192, 160).__geo_interface__, "properties": {}}
    gj = tmp_path / "region.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [region]}))
    r = scan_slide(predictor, slide, tmp_path / "o3", ScanSettings(mask=str(gj)))
    tiles = pd.read_csv(r.folder / "tiles.csv")
    assert len(tiles) == 4 * 3 and tiles.x.min() == 64 and tiles.y.min() == 64


def test_demo_slide_step(run: Path, tmp_path: Path) -> None:
    from histoscan.demo import demo_slide

    folder = demo_slide(run, tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["tiles"] > 300 and (folder / "heatmap.png").is_file()


def test_a_folder_holding_earlier_scans_and_a_non_slide_tiff(run: Path, slides: Path, tmp_path: Path) -> None:
    """Scan outputs kept beside the slides are not taken for slides; a TIFF that is no slide is a listed failure."""
    folder = tmp_path / "in"
    shutil.copytree(slides, folder)
    first = run_slides(lambda: Predictor(run, backend="torch"), [folder / "a.tif"], folder / "scans", ScanSettings())
    assert [r.slide for r in first.scanned] == ["a"] and (folder / "scans" / "a" / outputs.PROB_FILE).is_file()
    noisy = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    noisy[0, 0] = np.nan
    tifffile.imwrite(folder / "not-a-slide.tif", noisy)
    res = CliRunner().invoke(
        app, ["slide", str(run), str(folder), "--out", str(tmp_path / "out"), "--backend", "torch"]
    )
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "slides.csv").set_index("slide")
    assert set(table.index) == {"a", "b", "c", "not-a-slide"}  # nothing from folder/scans/
    assert table.loc["not-a-slide", "status"] == "failed" and "not-a-slide.tif" in table.loc["not-a-slide", "error"]


def test_each_tile_carries_the_answer_under_the_referral_rule_fitted_for_it(
    run: Path, slides: Path, tmp_path: Path
) -> None:
    from histoscan.trust.calibrate import fit_run_referral

    mine = Path(shutil.copytree(run, tmp_path / "run"))
    rule = fit_run_referral(mine, coverage=0.6, tta=[0])  # the slide's default views follow the deployed ones
    r = scan_slide(Predictor(mine, backend="torch"), slides / "a.tif", tmp_path / "out", ScanSettings())
    tiles = pd.read_csv(r.folder / "tiles.csv")
    lo, hi = rule.band or (0.0, 0.0)
    refer = tiles.answer == "refer"
    assert refer.any() and ((tiles.probability[refer] > lo - 1e-6) & (tiles.probability[refer] < hi + 1e-6)).all()
    answered = tiles[~tiles.answer.isin(["refer", "not tissue", "out of distribution"])]
    assert set(answered.answer) <= set(read_bundle(mine).classes)
    inside = (answered.probability > lo + 1e-6) & (answered.probability < hi - 1e-6)
    assert not inside.any()  # every tile in the band was referred
    assert r.summary["referred_tiles"] == int(refer.sum())
    assert r.summary["out_of_distribution_tiles"] == int((tiles.answer == "out of distribution").sum())
